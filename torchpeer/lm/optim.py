"""AdamW parameter groups and learning-rate schedules.

Groups:
* ``decay``: matrices of linear layers (weight decay ``train.weight_decay``);
* ``no_decay``: 1-D parameters (norms, biases), embeddings (tied or not), and what an FFW lists
  as "no_decay" in its ``optim_groups()`` (product keys, query norms);
* ``experts``: what an FFW lists as "expert" in ``optim_groups()`` (PEER's ``down``/``up``, PKM's
  values), with their own lr (``train.expert_lr``, default ``train.lr``) and weight decay
  (``train.expert_weight_decay``, default 0: a row is read by few tokens, so decaying every row
  at every step would mostly shrink rows that received no gradient).

Per-parameter lr multipliers: a module may list ``lr_scales() -> [(multiplier, [params])]`` (PEER's
``key_lr_scale`` / ``query_lr_scale``). Such a parameter goes to a group of its own, named
``"<group>*<multiplier>"`` (e.g. ``"no_decay*3"`` for sub-keys at 3 x lr), with lr and
``base_lr`` = multiplier x the group's lr and the group's weight decay; the schedule scales every
group alike, so the ratio holds at every step. Without multipliers the groups are exactly the
three above (old optimizer states keep loading).

Expert-lr ramp (``train.expert_lr_final``, UltraMem's value-lr schedule): the groups of the expert
tables ("experts", "experts*<m>") get one more factor, ``ExpertLRRamp(step)``, which goes linearly
from 1 at step 0 to expert_lr_final / expert_lr at the last step; ``set_lr`` applies it. The
groups' ``base_lr`` stays the start value, so optimizer states load as before.

The FFW contract (``torchpeer.layers.registry``): ``optim_groups() -> {"expert": [...],
"no_decay": [...]}``; modules without it are grouped by shape alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchpeer.lm.config import TrainConfig


def ffw_groups(model: nn.Module) -> dict[str, set[int]]:
    """ids of the parameters that the modules of ``model`` list in their ``optim_groups()``."""
    ids: dict[str, set[int]] = {"expert": set(), "no_decay": set()}
    for mod in model.modules():
        fn = getattr(mod, "optim_groups", None)
        if not callable(fn):
            continue
        for key, params in fn().items():
            if key not in ids:
                name = type(mod).__name__
                raise ValueError(f"{name}.optim_groups() returned unknown group {key!r}; use {sorted(ids)}")
            ids[key].update(id(p) for p in params)
    return ids


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the expert-table parameters (PEER down/up, PKM values)."""
    return ffw_groups(model)["expert"]


def lr_scales(model: nn.Module) -> dict[int, float]:
    """{id(param): lr multiplier} from the modules' ``lr_scales()``; a parameter given two different
    multipliers is a ValueError."""
    out: dict[int, float] = {}
    for name, mod in model.named_modules():
        fn = getattr(mod, "lr_scales", None)
        if not callable(fn):
            continue
        for scale, params in fn():
            if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
                raise ValueError(f"{name or type(mod).__name__}.lr_scales() gave multiplier {scale!r}; use one > 0")
            for p in params:
                if out.setdefault(id(p), float(scale)) != float(scale):
                    raise ValueError(f"a parameter of {name} has two lr multipliers: {out[id(p)]} and {scale}")
    return out


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups (see module docstring); every trainable parameter is in exactly one."""
    listed = ffw_groups(model)
    scales = lr_scales(model)
    experts = listed["expert"]
    no_decay_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    no_decay_ids |= listed["no_decay"]
    groups: dict[tuple[str, float], list] = {("decay", 1.0): [], ("no_decay", 1.0): [], ("experts", 1.0): []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in experts:
            kind = "experts"
        elif p.dim() < 2 or id(p) in no_decay_ids:
            kind = "no_decay"
        else:
            kind = "decay"
        groups.setdefault((kind, scales.get(id(p), 1.0)), []).append(p)
    expert_lr = cfg.table_lr
    spec = {
        "decay": (cfg.lr, cfg.weight_decay),
        "no_decay": (cfg.lr, 0.0),
        "experts": (expert_lr, cfg.expert_weight_decay),
    }
    out = []
    for (kind, scale), params in groups.items():
        if params:
            lr = spec[kind][0] * scale
            name = kind if scale == 1.0 else f"{kind}*{scale:g}"
            out.append({"name": name, "params": params, "lr": lr, "base_lr": lr, "weight_decay": spec[kind][1]})
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over ``param_groups``; fused on CUDA."""
    kwargs = {"fused": True} if device_type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def attach_table_optimizer(model: nn.Module, cfg: TrainConfig, check_backend: bool = True):
    """The fused table optimizer ``cfg.expert_optimizer`` names (rowwise_adam* / elementwise_adam*),
    installed on the PEER layers of ``model`` (torchpeer.optim.attach_rowwise_adam: it takes their
    tables out of the AdamW groups, so call it before build_optimizer); None for "adamw".
    check_backend=False: the sweep's meta-device build check (no Triton device check)."""
    from torchpeer.optim.fused_tables import FUSED_EXPERT_OPTIMIZERS, attach_rowwise_adam

    if cfg.expert_optimizer not in FUSED_EXPERT_OPTIMIZERS:
        return None
    args = (model, cfg.table_lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.expert_weight_decay)
    return attach_rowwise_adam(*args, check_backend=check_backend, **FUSED_EXPERT_OPTIMIZERS[cfg.expert_optimizer])


class LRSchedule:
    """lr multiplier at step s (0-based) for a run of ``total_steps`` steps.

    cosine: linear warmup to 1, then cosine down to ``min_ratio`` at the last step.
    wsd: warmup, flat at 1, then linear decay to ``min_ratio`` over the last ``decay_frac``.
    constant: warmup then 1.
    """

    def __init__(self, kind: str, total_steps: int, warmup: int, min_ratio: float, decay_frac: float):
        self.kind, self.total_steps, self.warmup = kind, total_steps, warmup
        self.min_ratio, self.decay_frac = min_ratio, decay_frac

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - 1)
        if self.kind == "cosine":
            t = min(1.0, (step - self.warmup) / max(1, span - self.warmup))
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        decay_start = max(self.warmup, int(round(self.total_steps * (1 - self.decay_frac))))
        if step < decay_start:
            return 1.0
        t = min(1.0, (step - decay_start) / max(1, span - decay_start))
        return 1.0 - (1 - self.min_ratio) * t

    def state_dict(self) -> dict:
        return dict(vars(self))


class ExpertLRRamp:
    """Factor of the expert tables' lr at step s (0-based) of a run of ``total_steps`` steps: linear
    from 1 at step 0 to ``final / start`` at step total_steps - 1 (and after). ``start``: the
    tables' lr at step 0 (train.expert_lr, or lr); ``final``: train.expert_lr_final, None = 1 always.
    A pure function of the step, so a resumed run applies exactly the lr it would have."""

    def __init__(self, total_steps: int, start: float, final: float | None):
        self.total_steps, self.start, self.final = total_steps, start, final

    @classmethod
    def from_config(cls, cfg: TrainConfig, total_steps: int) -> ExpertLRRamp:
        return cls(total_steps, cfg.table_lr, cfg.expert_lr_final)

    def __call__(self, step: int) -> float:
        if self.final is None:
            return 1.0
        t = min(1.0, max(0, step) / max(1, self.total_steps - 1))
        return 1.0 + (self.final / self.start - 1.0) * t


def is_expert_group(group: dict) -> bool:
    """A ``param_groups`` group of expert tables ("experts" or "experts*<multiplier>")."""
    name = group.get("name", "")
    return name == "experts" or name.startswith("experts*")


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float, expert_multiplier: float = 1.0) -> None:
    """Every group's lr = base_lr * multiplier (the schedule), times expert_multiplier (the
    ``ExpertLRRamp`` factor) for the expert-table groups."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier * (expert_multiplier if is_expert_group(g) else 1.0)
