"""Read a run's ``metrics.jsonl`` (or its committed copy, ``metrics.jsonl.xz``) into plottable series
(no matplotlib needed).

The trainer appends one JSON object per event (torchpeer/lm: the trainer's metrics log):

    {"step": 0, "event": "start", "tokens_per_step": ..., "parent"?: {"step", "tokens", "time"}, ...}
    {"step": s, "tokens": ..., "loss": ..., "lr": ..., "grad_norm": ..., "tok_per_s": ..., "time": ...,
     "routing"?: {LAYER: {"usage_pct", "kl"}}}   (train.track_usage: the log window's training tokens)
    {"step": s, "eval": {SET: {"loss", "ppl", "bpb", "usage": {LAYER: {"usage_pct", "kl"}}}}, "final"?: true}

Lines cut by a kill are skipped; when a step appears twice (a resumed run's repeated record), the
last record wins. A run that continued another one's weights (``torchpeer train EXPORT_DIR``) has a
"parent" in its start record: where those weights stood; its curves are drawn after the parent's
(``RunMetrics.offset``).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field

from torchpeer.jsonl import DamagedFile, read_json_lines, run_metrics_path, say_damaged

TRAIN_KEYS = ("tokens", "time", "loss", "lr", "tok_per_s", "grad_norm")
EVAL_KEYS = ("loss", "ppl", "bpb")


@dataclass
class Series:
    """One curve: x = training step, y = value (``final`` marks the end-of-run full evaluation)."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    final: list[bool] = field(default_factory=list)


@dataclass
class RunMetrics:
    """Everything ``torchpeer plot`` draws for one run.

    train: key (TRAIN_KEYS) -> Series; evals: eval set -> key (EVAL_KEYS) -> Series;
    routing: (eval set, or "train" for train.track_usage's windows, layer) -> {"usage_pct": Series,
    "kl": Series}; offset: {"step", "tokens",
    "time"} of the parent run at which this one started (zeros for a run from scratch).
    """

    name: str
    path: str
    tokens_per_step: int | None = None
    train: dict[str, Series] = field(default_factory=dict)
    evals: dict[str, dict[str, Series]] = field(default_factory=dict)
    routing: dict[tuple[str, str], dict[str, Series]] = field(default_factory=dict)
    offset: dict[str, float] = field(default_factory=lambda: {"step": 0.0, "tokens": 0.0, "time": 0.0})

    def tokens_at(self, step: float) -> float | None:
        """Training tokens seen after ``step`` optimizer steps (None if unknown)."""
        if self.tokens_per_step:
            return step * self.tokens_per_step
        tok = self.train.get("tokens")
        if tok and tok.steps and tok.steps[-1] > 0:
            return step * tok.values[-1] / tok.steps[-1]
        return None


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _put(series: Series, step: int, value, final: bool = False) -> None:
    v = _number(value)
    if v is None:
        return
    if series.steps and series.steps[-1] == step:  # repeated record for this step: keep the last
        series.values[-1], series.final[-1] = v, final
        return
    series.steps.append(step)
    series.values.append(v)
    series.final.append(final)


def metrics_path(run_dir: str) -> str:
    """RUN_DIR/metrics.jsonl, else RUN_DIR/metrics.jsonl.xz (a path to the file itself is accepted
    too); clear errors otherwise."""
    if os.path.isfile(run_dir) and run_dir.endswith((".jsonl", ".jsonl.xz")):
        return run_dir
    if not os.path.exists(run_dir):
        raise FileNotFoundError(f"run dir {run_dir} does not exist")
    if not os.path.isdir(run_dir):
        raise NotADirectoryError(f"{run_dir} is not a run dir (give the folder that holds metrics.jsonl)")
    path = run_metrics_path(run_dir)
    if path is None and (runs := _logged_runs_below(run_dir)):  # a sweep's runs folder, say
        shown = " ".join(runs[:3]) + (" ..." if len(runs) > 3 else "")
        sweep = os.path.isfile(os.path.join(run_dir, "results.jsonl"))
        also = f"; a sweep's figures: torchpeer report {run_dir}" if sweep else ""
        raise FileNotFoundError(
            f"{run_dir} is a folder of {len(runs)} runs, not one run: give the runs to draw together, "
            f"e.g. torchpeer plot {shown}{also}"
        )
    if path is None and (source := _source_run(run_dir)):  # a checkpoint or export-hf folder
        what, run = source
        raise FileNotFoundError(f"{run_dir} is {what}, which has no curves of its own: torchpeer plot {run}")
    if path is None:
        raise FileNotFoundError(
            f"{run_dir} has no metrics.jsonl: not a torchpeer run dir, or its training has not logged yet "
            "(torchpeer train writes RUN_DIR/metrics.jsonl)"
        )
    return path


def _source_run(folder: str) -> tuple[str, str] | None:
    """(what ``folder`` is, the run folder whose curves it belongs to) for a checkpoint folder
    (RUN/checkpoints/step_N) or an export-hf folder (its torchpeer_origin.json names the checkpoint
    it came from) whose run has a metrics.jsonl (or .xz); else None."""
    norm = os.path.normpath(folder)
    parent = os.path.dirname(norm)
    if os.path.basename(parent) == "checkpoints":
        what, run = "a checkpoint folder", os.path.dirname(parent)
    else:
        try:
            with open(os.path.join(norm, "torchpeer_origin.json"), encoding="utf-8") as fh:
                ckpt = json.load(fh)["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        what, run = "an export-hf folder", os.path.dirname(os.path.dirname(str(ckpt)))
    if run_metrics_path(run or ".") is None:
        return None
    if os.path.isabs(run) and not os.path.isabs(folder):
        run = os.path.relpath(run)  # as the user named the folder
    return what, run


def _logged_runs_below(folder: str, depth: int = 2) -> list[str]:
    """Folders with a metrics.jsonl (or .xz) under ``folder``, up to ``depth`` levels down, sorted."""
    out = []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isdir(sub):
            continue
        if run_metrics_path(sub) is not None:
            out.append(sub)
        elif depth > 1:
            out += _logged_runs_below(sub, depth - 1)
    return out


def read_metrics(run_dir: str, name: str | None = None) -> RunMetrics:
    """Parse RUN_DIR/metrics.jsonl (or .xz). ``name`` defaults to the run folder's name."""
    path = metrics_path(run_dir)
    folder = os.path.dirname(os.path.abspath(path))
    run = RunMetrics(name=name or os.path.basename(folder), path=folder)
    lines = read_json_lines(path)
    if lines.damaged():  # a cut last line is what a kill leaves: not worth a word
        say_damaged(path, lines.damaged(), "are not JSON objects and were skipped (a damaged file)")
    records = [rec for rec in lines.records if isinstance(rec.get("step"), int)]
    records.sort(key=lambda r: r["step"])  # stable: records of one step keep their order
    for rec in records:
        step = rec["step"]
        if rec.get("event") == "start" and _number(rec.get("tokens_per_step")):
            run.tokens_per_step = int(rec["tokens_per_step"])
        if rec.get("event") == "start" and isinstance(rec.get("parent"), dict):
            for key in run.offset:
                run.offset[key] = _number(rec["parent"].get(key)) or 0.0
        if "loss" in rec and "eval" not in rec:
            for key in TRAIN_KEYS:
                if key in rec:
                    _put(run.train.setdefault(key, Series()), step, rec[key])
            _put_routing(run, "train", rec.get("routing"), step, False)  # train.track_usage's windows
        results = rec.get("eval")
        if isinstance(results, dict):
            final = bool(rec.get("final"))
            for set_name, r in results.items():
                if not isinstance(r, dict):
                    continue
                curves = run.evals.setdefault(set_name, {})
                for key in EVAL_KEYS:
                    if key in r:
                        _put(curves.setdefault(key, Series()), step, r[key], final)
                _put_routing(run, set_name, r.get("usage"), step, final)
    if not run.train and not run.evals:
        raise ValueError(f"{path} has no training or evaluation records yet (wait for the first log step)")
    return run


def read_metrics_if_logged(run_dir: str) -> RunMetrics | None:
    """``read_metrics(run_dir)``, or None when the run has no log to read (no folder, not a folder, no
    metrics.jsonl or no record yet): what a sweep report does for each run, which may not have logged.
    A damaged metrics.jsonl.xz is not "no log": its DamagedFile error goes through.

    One report reads each run's log in several sections (curves, evaluations, gap, usage), so the parse
    is kept while the file's size and mtime stay the same: read-only callers share one RunMetrics."""
    try:
        path = os.path.abspath(metrics_path(run_dir))
        st = os.stat(path)
        return _read_unchanged(path, st.st_mtime_ns, st.st_size)
    except DamagedFile:
        raise
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


@functools.lru_cache(maxsize=256)
def _read_unchanged(path: str, mtime_ns: int, size: int) -> RunMetrics:
    """read_metrics of the file PATH as it stood at (mtime_ns, size): the key changes when a line lands."""
    return read_metrics(path)


def _put_routing(run: RunMetrics, set_name: str, usage, step: int, final: bool) -> None:
    """{layer: {"usage_pct", "kl"}} of one record into run.routing[(set_name, layer)]."""
    for layer, u in (usage if isinstance(usage, dict) else {}).items():
        if isinstance(u, dict):
            layer_curves = run.routing.setdefault((set_name, layer), {})
            for key in ("usage_pct", "kl"):
                if key in u:
                    _put(layer_curves.setdefault(key, Series()), step, u[key], final)
