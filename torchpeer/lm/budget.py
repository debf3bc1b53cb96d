"""The step budget of a run: how many optimizer steps its config asks for, and which setting decides."""

from __future__ import annotations

import math

from torchpeer.lm.config import RunConfig


def plan_steps(cfg: RunConfig, train_flops_per_token: int) -> int:
    """Number of optimizer steps: the first of max_steps / max_tokens / max_flops reached
    (train.batch_size is the global batch: the same steps whatever the number of processes)."""
    return step_budget(cfg, train_flops_per_token)[0]


def step_budget(cfg: RunConfig, train_flops_per_token: int) -> tuple[int, str]:
    """(plan_steps, the setting that decides it: "train.max_steps = 500")."""
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    limits = []
    if t.max_steps is not None:
        limits.append((int(t.max_steps), f"train.max_steps = {t.max_steps}"))
    if t.max_tokens is not None:
        per = f"{tokens_per_step:,} tokens per step"
        limits.append((math.ceil(t.max_tokens / tokens_per_step), f"train.max_tokens = {t.max_tokens:.4g} at {per}"))
    if t.max_flops is not None:
        n = int(t.max_flops // (train_flops_per_token * tokens_per_step))
        if n < 1:
            raise ValueError(
                f"train.max_flops={t.max_flops:.3g} is less than one step "
                f"({train_flops_per_token * tokens_per_step:.3g} FLOPs); raise it or shrink the batch"
            )
        limits.append((n, f"train.max_flops = {t.max_flops:.4g}"))
    return min(limits, key=lambda limit: limit[0])


def beyond_budget(step: int, total: int, setting: str, run_dir: str) -> str:
    """The error for a checkpoint past the configured budget, naming the flag that sets the budget."""
    flag = setting.split(" = ")[0]
    return (
        f"the checkpoint is at step {step}, beyond this config's {total} steps ({setting}); to train on, raise "
        f"--{flag} past step {step}; to evaluate it as it is: torchpeer eval {run_dir}"
    )
