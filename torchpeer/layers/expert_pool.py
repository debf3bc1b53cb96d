"""The expert tables of PEER, and ``ExpertPool``: one set of tables read by several PEER layers.

Each expert i is a row of each table: ``down`` (u_i), ``up`` (v_i) and, for the "glu" read-out,
``lin`` (w_i), all (n_experts, d_model). A PEER layer normally owns its tables. With
``PEERConfig.shared_pool`` the LM builds one ``ExpertPool`` (``TransformerLM.ffw_shared``) and
every PEER layer of the model reads it, each through its own router (query network, norm,
sub-keys), as Memory+ shares one value pool between its memory layers (Berges et al. 2024). The
pool is a module of the LM only (not of the layers), so it is counted, saved and optimised once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchpeer.diagnostics import ExpertUsage
from torchpeer.layers.validators import check_positive


def expert_tables(n_experts: int, d_model: int, up_init_std: float, glu: bool = False) -> dict[str, nn.Parameter]:
    """{"down", "up"[, "lin"]}: fresh (n_experts, d_model) tables, drawn in this order.

    down (u) and lin (w) ~ N(0, 1/d_model), so u.x and w.x have unit variance for unit-variance x;
    up (v) ~ N(0, up_init_std**2) (PEER's docstring says why 1/sqrt(d_model) is the default).
    """
    tables = {
        "down": nn.Parameter(torch.randn(n_experts, d_model) / math.sqrt(d_model)),
        "up": nn.Parameter(torch.randn(n_experts, d_model) * up_init_std),
    }
    if glu:
        tables["lin"] = nn.Parameter(torch.randn(n_experts, d_model) / math.sqrt(d_model))
    return tables


TABLE_NAMES = ("down", "up", "lin")


class ExpertPool(nn.Module):
    """Expert tables shared by several PEER layers. Attributes ``down``, ``up`` (and ``lin`` if
    ``glu``): (n_experts, d_model) Parameters, initialised as a PEER layer's own (``expert_tables``).

    Args:
        n_experts, d_model: table shape (every layer that reads the pool must match it).
        up_init_std: std of ``up`` at init; None = 1/sqrt(d_model) (PEER's default).
        glu: also the ``lin`` table (read-out "glu").
    """

    def __init__(self, n_experts: int, d_model: int, up_init_std: float | None = None, glu: bool = False):
        super().__init__()
        check_positive(n_experts=n_experts, d_model=d_model)
        self.n_experts, self.d_model, self.glu = n_experts, d_model, glu
        self.up_init_std = 1.0 / math.sqrt(d_model) if up_init_std is None else float(up_init_std)
        for name, table in expert_tables(n_experts, d_model, self.up_init_std, glu).items():
            setattr(self, name, table)

    @classmethod
    def from_config(cls, d_model: int, cfg) -> ExpertPool | None:
        """The pool a ``PEERConfig`` asks for: None unless ``cfg.shared_pool``."""
        if not cfg.shared_pool:
            return None
        return cls(cfg.n_experts, d_model, cfg.up_init_std, glu=cfg.readout == "glu")

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """All tables are expert tables (own lr, no decay by default), as in an unshared layer."""
        return {"expert": list(self.parameters()), "no_decay": []}

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, glu={self.glu}, up_init_std={self.up_init_std:.4g}"


def pool_usage_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Usage of every ``ExpertPool`` in ``model`` over all the layers that read it:
    {pool's module name: {"usage_pct", "kl", "layers"}}.

    usage_pct and kl are defined as a layer's (``torchpeer.diagnostics.ExpertUsage``), on the sum of
    the gate mass the reading layers accumulated: an expert counts as used if any layer selected it,
    and kl is KL(z || uniform) of z = that sum, normalised over the pool's n_experts. Each layer's
    gates sum to the same mass per token and head, so every reading layer weighs alike. "layers":
    how many tracked layers read the pool. Per-layer numbers (``usage_report``) bound usage_pct from
    below: with a shared pool an expert unused by one layer may serve another.

    Pools whose layers tracked nothing (``enable_usage_tracking`` off, or no forward yet) are left out.
    """
    readers: dict[int, list] = {}
    for mod in model.modules():
        pool, tracker = getattr(mod, "pool", None), getattr(mod, "usage_tracker", None)
        if isinstance(pool, ExpertPool) and isinstance(tracker, ExpertUsage) and tracker.scores is not None:
            readers.setdefault(id(pool), []).append(tracker.scores)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertPool) and id(mod) in readers:
            total = ExpertUsage(mod.n_experts)
            scores = readers.pop(id(mod))
            total.scores = torch.stack([s.to(scores[0].device) for s in scores]).sum(0)
            out[name or "."] = {**total.summary(), "layers": len(scores)}
    return out


def pool_usage(model: nn.Module) -> dict[str, float] | None:
    """Usage % and KL of the shared pool ``model.ffw_shared`` over all the layers that read it (see
    ``pool_usage_report``): {"usage_pct", "kl"}. None without a pool or without tracked routing."""
    pool = getattr(model, "ffw_shared", None)
    if not isinstance(pool, ExpertPool):
        return None
    for name, mod in model.named_modules():
        if mod is pool:
            rep = pool_usage_report(model).get(name)
            return None if rep is None else {"usage_pct": rep["usage_pct"], "kl": rep["kl"]}
    return None
