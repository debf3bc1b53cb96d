"""The dry run's build check: each planned run's model, table optimizer and AdamW groups, built on
the meta device (no memory, no kernels) before any GPU time is spent on them.

Why: planning already builds each model once (for its cost), but not what the trainer builds next:
the fused table optimizer (``train.expert_optimizer = rowwise_adam*`` / ``elementwise_adam*``) and
the optimizer groups (``train.expert_lr``, the key and query lr scales, the table lr ramp). A
design whose combination those refuse (the winner on a shared pool with a fused optimizer did,
before the pool had its deferred update) otherwise fails only on the GPU, after the data is
prepared and the device is held.
"""

from __future__ import annotations

import copy

import torch

from torchpeer.experiments.plan import PlannedRun, planned_vocab_size


def build_error(run: PlannedRun) -> str | None:
    """None when the trainer's build of ``run`` (model, fused table optimizer, AdamW groups, the
    table lr ramp) succeeds on the meta device; else the error's message. The device-only check
    (can Triton run on the tables' device?) is skipped: a GPU run passes it."""
    from torchpeer.lm.model import TransformerLM
    from torchpeer.lm.optim import ExpertLRRamp, build_optimizer
    from torchpeer.lm.trainer import FUSED_EXPERT_OPTIMIZERS

    model_cfg = copy.deepcopy(run.cfg.model)
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = planned_vocab_size(run.cfg)
    t = run.cfg.train
    try:
        with torch.device("meta"):
            model = TransformerLM(model_cfg)
        if t.expert_optimizer in FUSED_EXPERT_OPTIMIZERS:
            from torchpeer.optim import attach_rowwise_adam

            args = (model, t.table_lr, (t.beta1, t.beta2), t.eps, t.expert_weight_decay)
            attach_rowwise_adam(*args, check_backend=False, **FUSED_EXPERT_OPTIMIZERS[t.expert_optimizer])
        build_optimizer(model, t, "cuda")
        ExpertLRRamp.from_config(t, run.steps)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_builds(runs: list[PlannedRun]) -> list[tuple[str, str]]:
    """(run name, error) for every run in ``runs`` whose build fails (~0.02 s a run: meta tensors)."""
    return [(run.name, err) for run in runs if (err := build_error(run)) is not None]
