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


def pool_usage(model: nn.Module) -> dict[str, float] | None:
    """Usage % and KL of the shared pool ``model.ffw_shared`` over all the layers that read it: the
    union of their accumulated gate mass (per-layer usage is ``torchpeer.diagnostics.usage_report``;
    with a shared pool an expert unused by one layer may serve another). None without a pool or
    without tracked routing (``enable_usage_tracking``)."""
    pool = getattr(model, "ffw_shared", None)
    if not isinstance(pool, ExpertPool):
        return None
    total = ExpertUsage(pool.n_experts)
    for mod in model.modules():
        tracker = getattr(mod, "usage_tracker", None)
        if getattr(mod, "pool", None) is pool and tracker is not None and tracker.scores is not None:
            total.scores = tracker.scores.clone() if total.scores is None else total.scores + tracker.scores
    return None if total.scores is None else total.summary()
