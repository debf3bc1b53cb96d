"""The step budget of a run: how many optimizer steps its config asks for, and which setting decides."""

from __future__ import annotations

import math

from torchpeer.lm.config import RunConfig


def plan_steps(cfg: RunConfig, train_flops_per_token: int) -> int:
    """Number of optimizer steps: the first of max_steps / max_tokens / max_flops reached
    (train.batch_size is the global batch: the same steps whatever the number of processes)."""
    return step_budget(cfg, train_flops_per_token)[0]


BUDGET_FIELDS = ("train.max_steps", "train.max_tokens", "train.max_flops")


def step_budget(cfg: RunConfig, train_flops_per_token: int) -> tuple[int, str]:
    """(plan_steps, the setting that decides it: "train.max_steps = 500")."""
    return min(_limits(cfg, train_flops_per_token), key=lambda limit: limit[0])


def preempted_note(cfg: RunConfig, train_flops_per_token: int | None, given) -> str | None:
    """A note when a budget field in ``given`` (those the command line set: "train.max_tokens")
    is never reached because another set field stops the run first: ``--train.max_tokens 2e6`` on
    ptb-tiny, whose max_steps = 500 ends the run at 1.02M tokens. None otherwise. Without
    ``train_flops_per_token`` a max_flops limit is left out."""
    limits = _limits(cfg, train_flops_per_token)
    steps, setting = min(limits, key=lambda limit: limit[0])
    later = [(n, s) for n, s in limits if n > steps and s.split(" = ")[0] in given]
    if not later:
        return None
    unreached = "; ".join(f"{s} (step {n:,})" for n, s in later)
    return (
        f"note: {setting} ends the run at step {steps:,}, before {unreached} is reached; "
        f"to train to it, also give --{setting.split(' = ')[0]} none"
    )


def warmup_note(cfg: RunConfig, steps: int) -> str | None:
    """A note when the warmup is longer than the run's ``steps``: the lr never reaches train.lr
    (a short run of ptb-tiny: 10 steps of its 50-step warmup peak at a fifth of the lr)."""
    t = cfg.train
    if t.warmup_steps <= steps:
        return None
    return (
        f"note: train.warmup_steps = {t.warmup_steps} is longer than the run's {steps:,} steps: the lr "
        f"rises to {t.lr * steps / t.warmup_steps:.3g} at most, never train.lr = {t.lr:.3g}; to reach it, "
        f"give --train.warmup_steps below {steps}, e.g. {steps // 10}"
    )


def _limits(cfg: RunConfig, train_flops_per_token: int | None) -> list[tuple[int, str]]:
    """[(steps, "train.max_steps = 500"), ...]: the steps each set budget field allows."""
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    limits = []
    if t.max_steps is not None:
        limits.append((int(t.max_steps), f"train.max_steps = {t.max_steps}"))
    if t.max_tokens is not None:
        per = f"{tokens_per_step:,} tokens per step"
        limits.append((math.ceil(t.max_tokens / tokens_per_step), f"train.max_tokens = {t.max_tokens:.4g} at {per}"))
    if t.max_flops is not None and train_flops_per_token is not None:
        n = int(t.max_flops // (train_flops_per_token * tokens_per_step))
        if n < 1:
            raise ValueError(
                f"train.max_flops={t.max_flops:.3g} is less than one step "
                f"({train_flops_per_token * tokens_per_step:.3g} FLOPs); raise it or shrink the batch"
            )
        limits.append((n, f"train.max_flops = {t.max_flops:.4g}"))
    return limits


def beyond_budget(step: int, total: int, setting: str, run_dir: str) -> str:
    """The error for a checkpoint past the configured budget, naming the flag that sets the budget."""
    flag = setting.split(" = ")[0]
    return (
        f"the checkpoint is at step {step}, beyond this config's {total} steps ({setting}); to train on, raise "
        f"--{flag} past step {step}; to evaluate it as it is: torchpeer eval {run_dir}"
    )
