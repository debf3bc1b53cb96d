"""The run folder as a place that is written: a writability check before a run, one clear error
for a failed write (read-only or full disk), and cleanup of partial checkpoints a kill left behind.

A failed write never touches what is already there: checkpoints are assembled under a temporary
name and renamed into place (checkpoint.py), other files are replaced atomically.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile

# Partial checkpoint folders: ".step_00001000.<random>.tmp" (being assembled) and
# "step_00001000.old" (the previous copy of a step that was being re-saved).
_PARTIAL = re.compile(r"^(\.step_\d+\..*\.tmp|step_\d+\.old)$")


class RunWriteError(OSError):
    """Writing the run folder failed (read-only file system, disk full, not a directory, ...).

    The message is one line that says what could not be written, why, and that the existing
    checkpoints are intact; the CLI prints it and exits with status 2.
    """


def _reason(e: BaseException) -> str:
    """Why a write failed, in a few words (OSError strerror, or torch's C++ writer message)."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            reason = "no space left on the device"
        return reason
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    code = re.search(r"\(os error (\d+)\)", first)  # safetensors: "I/O error: ... (os error 28) at path ..."
    if code:
        return _reason(OSError(int(code.group(1)), os.strerror(int(code.group(1)))))
    if "write" in first.lower():  # torch: "[enforce fail at inline_container.cc:...] ... file write failed"
        return f"file write failed, is the disk full? ({first})"
    return first


@contextlib.contextmanager
def writing(what: str):
    """Turn an OSError (or torch's / safetensors' error from a failed file write) inside the block
    into one RunWriteError that names ``what`` was being written."""
    try:
        yield
    except RunWriteError:
        raise
    except OSError as e:
        raise RunWriteError(f"cannot write {what}: {_reason(e)}; existing checkpoints are intact") from e
    except Exception as e:
        if not _is_write_failure(e):
            raise
        raise RunWriteError(f"cannot write {what}: {_reason(e)}; existing checkpoints are intact") from e


def _is_write_failure(e: Exception) -> bool:
    """torch's C++ writer (RuntimeError "... file write failed") or safetensors' (SafetensorError "I/O error")."""
    text = str(e)
    if isinstance(e, RuntimeError):
        return "write" in text.lower() or "inline_container" in text
    return type(e).__name__ == "SafetensorError" and "I/O error" in text


def check_writable(run_dir: str, what: str = "run folder", option: str = "--run-dir") -> None:
    """Raise RunWriteError unless files can be created in ``run_dir`` (or, if it does not exist
    yet, in its nearest existing parent: nothing is created by the check). ``what`` and ``option``
    name the folder and the command-line option that chose it in the message."""
    probe_dir = os.path.abspath(run_dir)
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        raise RunWriteError(
            f"cannot write {what} {run_dir}: {probe_dir} is a file, not a directory; choose another {option}"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise RunWriteError(
            f"cannot write {what} {run_dir}: {_reason(e)} ({probe_dir}); choose another {option} "
            "or free space; nothing was written"
        ) from e


def check_run_folder(run_dir: str, option: str = "--run-dir") -> None:
    """ValueError (one line) when ``run_dir`` holds a config.json that is not a torchpeer run config
    (an export-hf or transformers model folder, a project folder): a run would replace it."""
    import json

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError, UnicodeDecodeError):
        raw = None
    if isinstance(raw, dict) and {"model", "train", "data"} <= set(raw):
        return
    ours = os.path.isdir(os.path.join(run_dir, "checkpoints")) or os.path.isfile(os.path.join(run_dir, "metrics.jsonl"))
    if raw is None and ours:
        return  # the run's own config.json, unreadable: the run rewrites it (its checkpoints hold the config)
    kind = "an export-hf folder's" if isinstance(raw, dict) and isinstance(raw.get("torchpeer"), dict) else "another"
    raise ValueError(
        f"{run_dir} holds {kind} config.json, not a torchpeer run's; a run there would replace it, so nothing was "
        f"written: choose another {option}"
    )


# What a run writes first and only a run folder holds: a run folder (to resume, or that
# check_run_folder and the trainer judge) has one of these.
RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints")
# A job scheduler's log, which may be created in the run folder before the run starts
# (sbatch --output=runs/x/slurm.out): the run writes no file of these names.
_JOB_LOG = re.compile(r".+\.(out|err|log)$")


def check_new_run_folder(run_dir: str, option: str = "--run-dir") -> None:
    """ValueError (one line) when ``run_dir`` exists and holds other things but is not a run folder
    (none of RUN_MARKERS): a project folder, a folder of runs, a data folder. A run would write its
    config.json, checkpoints/, summary.json, ... among them and mix with or replace them, so
    ``torchpeer train`` refuses before writing anything. Missing, empty and run folders pass (a run
    folder: resume or the trainer's own checks decide), and so do hidden entries (.gitkeep) and job
    logs (*.out, *.err, *.log). Called by the CLI only: a Python caller of train() chooses its folder."""
    if not os.path.isdir(run_dir):
        return  # missing (created by the run) or a file (check_writable says so)
    entries = sorted(os.listdir(run_dir))
    if any(e in RUN_MARKERS for e in entries):
        return
    others = [
        e
        for e in entries
        if not e.startswith(".") and not (_JOB_LOG.match(e) and os.path.isfile(os.path.join(run_dir, e)))
    ]
    if not others:
        return
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    raise ValueError(
        f"{run_dir} is not empty and is not a torchpeer run folder (it holds {shown}); a run there would "
        f"write its files among them, so nothing was written: give {option} a new or empty folder, or the "
        "run folder to resume with --resume"
    )


def remove_stale_partials(run_dir: str) -> list[str]:
    """Delete partial checkpoint folders left by a kill mid-save; returns their names.

    Call it only when no other process is writing checkpoints into ``run_dir``.
    """
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        if not _PARTIAL.match(name):
            continue
        path = os.path.join(root, name)
        if name.endswith(".old") and not os.path.exists(path[: -len(".old")]):
            os.replace(path, path[: -len(".old")])  # killed mid-swap: the old copy is the complete one
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed
