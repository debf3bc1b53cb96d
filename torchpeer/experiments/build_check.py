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

import torch

from torchpeer.experiments.plan import PlannedRun, planned_model_config


def build_error(run: PlannedRun) -> str | None:
    """None when the trainer's build of ``run`` (model, fused table optimizer, AdamW groups, the
    table lr ramp) succeeds on the meta device; else the error's message. The device-only check
    (can Triton run on the tables' device?) is skipped: a GPU run passes it."""
    from torchpeer.lm.model import TransformerLM
    from torchpeer.lm.optim import ExpertLRRamp, attach_table_optimizer, build_optimizer

    t = run.cfg.train
    try:
        with torch.device("meta"):
            model = TransformerLM(planned_model_config(run.cfg))
        attach_table_optimizer(model, t, check_backend=False)
        build_optimizer(model, t, "cuda")
        ExpertLRRamp.from_config(t, run.steps)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_builds(runs: list[PlannedRun]) -> list[tuple[str, str]]:
    """(run name, error) for every run in ``runs`` whose build fails (~0.02 s a run: meta tensors)."""
    return [(run.name, err) for run in runs if (err := build_error(run)) is not None]
