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


def finished_message(run_dir: str, step: int, total: int, setting: str, cfg: RunConfig) -> str:
    """One line: the run had already finished (nothing was redone), and the command that trains it further."""
    flag = setting.split(" = ")[0]
    t = cfg.train
    if flag == "train.max_steps":
        more = str(2 * step)
    else:
        value = t.max_tokens if flag == "train.max_tokens" else t.max_flops
        more = f"{2 * value:.3g}".replace("e+0", "e").replace("e+", "e")
    again = shlex.join(["torchpeer", "train", run_dir, "--resume", f"--{flag}", more])
    return (
        f"{run_dir} had already finished at step {step}/{total} ({setting}) and its final evaluation is recorded "
        f"in summary.json: nothing was trained or evaluated again; to train further, raise {flag}, e.g. {again}"
    )


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
