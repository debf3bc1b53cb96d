"""A resume of a run that had already finished: how the trainer tells, and the line it prints.

A run has finished when its newest checkpoint is at the end of the config's budget and its final
evaluation of that step is recorded: summary.json of that step with every valid set of the config,
and the final record in metrics.jsonl. Such a resume builds, trains, evaluates and writes nothing
(Trainer.fit); a run stopped during its final evaluation, or resumed with an eval set added, has not
finished and evaluates when resumed.
"""

from __future__ import annotations

import json
import os
import shlex

from torchpeer.lm.budget import step_budget
from torchpeer.lm.checkpoint import checkpoint_step
from torchpeer.lm.config import RunConfig


def recorded_finish(run_dir: str, ckpt: str | None, cfg: RunConfig) -> tuple[dict, int, int, str] | None:
    """(recorded summary, checkpoint step, total steps, budget setting) when the run in ``run_dir``
    had finished at checkpoint ``ckpt`` under ``cfg``, else None. Reads files only (no tokenizer,
    model or data); for train.max_flops the FLOPs per token are the summary's (the checkpoint's model
    is the config's: check_same_model)."""
    if ckpt is None:
        return None
    step = checkpoint_step(ckpt)
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    if not (
        isinstance(summary, dict)
        and summary.get("steps") == step
        and isinstance(summary.get("train_flops_per_token"), int)
        and set(summary.get("valid") or {}) == set(cfg.data.valid)
        and _has_final_record(os.path.join(run_dir, "metrics.jsonl"), step)
    ):
        return None
    total, setting = step_budget(cfg, summary["train_flops_per_token"])
    return (summary, step, total, setting) if step == total else None


def _train_further(run_dir: str, step: int, setting: str, cfg: RunConfig) -> tuple[str, str]:
    """(the budget field that ended the run, a command that resumes it with that budget doubled)."""
    flag = setting.split(" = ")[0]
    t = cfg.train
    if flag == "train.max_steps":
        more = str(2 * step)
    else:
        value = t.max_tokens if flag == "train.max_tokens" else t.max_flops
        more = f"{2 * value:.3g}".replace("e+0", "e").replace("e+", "e")
    return flag, shlex.join(["torchpeer", "train", run_dir, "--resume", f"--{flag}", more])


def finished_hint(run_dir: str, latest: str, cfg: RunConfig) -> str | None:
    """When the run in ``run_dir`` (newest checkpoint ``latest``) had finished under ``cfg``: "has
    finished (at step N, ...): ..." naming the budget to raise with --resume (--resume alone would
    only report that it finished); else None."""
    found = recorded_finish(run_dir, latest, cfg)
    if found is None or not _intact(latest):  # damaged: --resume continues from an older one, or says none is intact
        return None
    _, step, _, setting = found
    flag, again = _train_further(run_dir, step, setting, cfg)
    others = " / ".join(f for f in ("train.max_steps", "train.max_tokens", "train.max_flops") if f != flag)
    return (
        f"has finished (at step {step}, {setting}): --resume alone has nothing to do; to train it further, "
        f"raise {flag} (or {others}) with --resume, e.g. {again}"
    )


def existing_run_error(run_dir: str, latest: str, cfg: RunConfig) -> ValueError:
    """The error of a new run (no --resume) in ``run_dir``, which holds checkpoints (newest: ``latest``):
    "pass --resume" for an unfinished run, the budget to raise with --resume for a finished one."""
    done = finished_hint(run_dir, latest, cfg)
    if done is None:
        return ValueError(
            f"{run_dir} already holds checkpoints (latest: {os.path.basename(latest)}); pass --resume "
            "to continue that run, or choose another --run-dir"
        )
    return ValueError(f"{run_dir} holds a run that {done}; to start a new run, choose another --run-dir")


def finished_message(run_dir: str, step: int, total: int, setting: str, cfg: RunConfig) -> str:
    """One line: the run had already finished (nothing was redone), and the command that trains it further."""
    flag, again = _train_further(run_dir, step, setting, cfg)
    return (
        f"{run_dir} had already finished at step {step}/{total} ({setting}) and its final evaluation is recorded "
        f"in summary.json: nothing was trained or evaluated again; to train further, raise {flag}, e.g. {again}"
    )


def _intact(ckpt: str) -> bool:
    """Whether checkpoint ``ckpt`` verifies (its checksums)."""
    from torchpeer.lm.integrity import CheckpointDamaged, verify_checkpoint

    try:
        verify_checkpoint(ckpt)
    except CheckpointDamaged:
        return False
    return True


def _read_json(path: str):
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _has_final_record(path: str, step: int) -> bool:
    """Whether metrics.jsonl holds the final evaluation record of ``step``."""
    from torchpeer.jsonl import read_json_lines

    if not os.path.isfile(path):
        return False
    return any(r.get("final") and r.get("step") == step for r in read_json_lines(path).records)
