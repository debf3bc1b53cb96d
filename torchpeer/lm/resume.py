"""Resuming a run: which checkpoint it continues from, under which config, and the run folder's
record of every config the run was trained under.

* ``resume_checkpoint(run_dir)``: the newest intact checkpoint (checksums, integrity.py). Newer
  damaged ones are moved aside to ``step_<N>.damaged`` (kept for inspection; never read, pruned or
  overwritten) and reported; when no checkpoint is intact, a ValueError says so and moves nothing.
* ``saved_run_config(run_dir)``: that checkpoint's config, which ``torchpeer train --resume``
  continues with (overrides given on resume are applied on top), or a ValueError when there is
  nothing to resume (a missing folder, a folder without checkpoints, a folder of several runs).
* ``config_changes(saved, cfg)``: ["train.max_steps: 60 -> 500", ...], printed on resume.
* ``record_config(run_dir, config, step)``: RUN_DIR/config.json is the current config; every config
  the run was trained under is kept as RUN_DIR/configs/from_step_<N>.json (in force from step N).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex

from torchpeer.data.atomic import write_json_atomic
from torchpeer.lm.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    newest_intact_checkpoint,
    read_checkpoint_config,
    runs_below,
)
from torchpeer.lm.config import RunConfig
from torchpeer.lm.run_lock import check_not_in_use

DAMAGED_SUFFIX = ".damaged"


def _no_intact_checkpoint(run_dir: str, damaged) -> ValueError:
    why = "; ".join(f"{os.path.basename(e.folder)}: {e.reason}" for e in damaged)
    aside = shlex.join(["mv", run_dir, os.path.normpath(run_dir) + ".damaged"])
    return ValueError(
        f"cannot resume {run_dir}: no intact checkpoint ({why}); nothing was changed: to start the run anew, "
        f"give another --run-dir, or move this folder aside ({aside}) and train into {run_dir} again"
    )


def resume_checkpoint(run_dir: str, move_damaged: bool = True) -> tuple[str | None, list[str]]:
    """(newest intact checkpoint of ``run_dir``, or None when it has no checkpoint; lines to print
    about newer damaged ones, which ``move_damaged`` renames to ``step_<N>.damaged``)."""
    if not list_checkpoints(run_dir):
        return None, []
    found, damaged = newest_intact_checkpoint(run_dir)
    if found is None:
        raise _no_intact_checkpoint(run_dir, damaged)
    notes = []
    for e in damaged:
        if not move_damaged:
            notes.append(f"{e}; resuming from {os.path.basename(found)}, the newest intact one")
            continue
        aside, n = e.folder + DAMAGED_SUFFIX, 1
        while os.path.exists(aside):
            n += 1
            aside = f"{e.folder}{DAMAGED_SUFFIX}.{n}"
        os.replace(e.folder, aside)
        notes.append(
            f"{e}; moved it to {os.path.basename(aside)} and resuming from {os.path.basename(found)}, "
            "the newest intact one"
        )
    return found, notes


def saved_run_config(run_dir: str) -> tuple[RunConfig, str]:
    """(config of the newest intact checkpoint of ``run_dir``, that checkpoint): what a resume
    continues with. ValueError/FileNotFoundError (one line) when there is nothing to resume."""
    if not os.path.exists(run_dir):
        raise FileNotFoundError(
            f"nothing to resume: {run_dir} does not exist; check --run-dir, or start the run without --resume"
        )
    if not os.path.isdir(run_dir):
        raise ValueError(f"nothing to resume: {run_dir} is a file, not a run folder; check --run-dir")
    candidates = _resumable(run_dir)
    if not candidates:
        runs = runs_below(run_dir)
        if runs:
            shown = ", ".join(runs[:8]) + (f" (and {len(runs) - 8} more)" if len(runs) > 8 else "")
            raise ValueError(f"{run_dir} is a folder of {len(runs)} runs, not one run: resume one of {shown}")
        started = os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
        if started:  # still training, before its first checkpoint: say that, not "nothing to resume"
            check_not_in_use(run_dir)
        why = " (the run stopped before its first checkpoint, or train.checkpoint = false)" if started else ""
        raise ValueError(
            f"nothing to resume in {run_dir}: it holds no checkpoint{why}; check --run-dir, "
            "or start the run without --resume"
        )
    found, damaged = newest_intact_checkpoint(run_dir, candidates)
    if found is None:
        raise _no_intact_checkpoint(run_dir, damaged)
    return read_checkpoint_config(found), found


def _resumable(run_dir: str) -> list[str]:
    """The checkpoints a resume will see, oldest first: the complete ones, and a ``step_<N>.old``
    whose ``step_<N>`` is missing (a kill mid re-save; the trainer renames it back when it starts,
    rundir.remove_stale_partials). Read-only: it runs before the trainer owns the folder."""
    found = list_checkpoints(run_dir)
    root = checkpoint_dir(run_dir)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if re.fullmatch(r"step_\d+\.old", name) and not os.path.exists(path[:-4]):
            if os.path.isfile(os.path.join(path, "trainer.pt")):
                found.append(path)
    return sorted(found, key=os.path.basename)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "valid":  # data.valid is one field (a name -> source table)
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def field_differences(before: dict, after: dict) -> list[tuple[str, object, object]]:
    """[("train.max_steps", 60, 500), ...]: the dotted fields that differ between two config dicts."""
    a, b = _flat(before), _flat(after)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def config_changes(saved: RunConfig, cfg: RunConfig) -> list[str]:
    """The fields in which ``cfg`` differs from a checkpoint's config (model.vocab_size None: taken
    from the tokenizer later, not a change)."""
    now = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model))
    if now.model.vocab_size is None:
        now.model.vocab_size = saved.model.vocab_size
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in field_differences(saved.to_dict(), now.to_dict())]


def record_config(run_dir: str, config: dict, step: int) -> str | None:
    """Write RUN_DIR/config.json; when the config differs from the one there (or the run starts),
    keep it as RUN_DIR/configs/from_step_<step>.json too. Returns that history file, or None."""
    current = os.path.join(run_dir, "config.json")
    history = os.path.join(run_dir, "configs")
    config = json.loads(json.dumps(config))  # as it will read back (tuples -> lists)
    previous = None
    if step > 0 and os.path.isfile(current):
        try:
            with open(current, encoding="utf-8") as fh:
                previous = json.load(fh)
        except (OSError, ValueError):
            previous = None
    entry = None
    if step == 0 or previous != config:
        if previous is not None and not os.path.isdir(history):  # a run from before the history was kept
            write_json_atomic(os.path.join(history, f"before_step_{step:08d}.json"), previous)
        entry = os.path.join(history, f"from_step_{step:08d}.json")
        write_json_atomic(entry, config)
    write_json_atomic(current, config)
    return entry
