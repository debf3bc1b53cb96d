"""RUNS_DIR/results.jsonl: one JSON object per finished run, each run once.

The file is rewritten atomically (temp file + rename) on every append, so a sweep killed at any
moment leaves either the old or the new file, never a cut line, and a run recorded again (e.g. a
summary found on resume) replaces its old line instead of duplicating it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from typing import Any

from torchpeer.jsonl import METRICS_FILE, METRICS_XZ, read_json_lines, run_metrics_path, say_damaged, write_xz_copy

RESULTS_FILE = "results.jsonl"


def results_path(runs_dir: str) -> str:
    return os.path.join(runs_dir, RESULTS_FILE)


def read_results(runs_dir: str) -> list[dict[str, Any]]:
    """Records of results.jsonl in file order (no file = []). A line that is not a JSON record (a
    damaged file) is skipped and said once on stderr with its line number: the runs it held count
    as not done, so the next sweep retrains them and rewrites the file."""
    path = results_path(runs_dir)
    if not os.path.exists(path):
        return []
    lines = read_json_lines(path, accept=lambda rec: "run" in rec)
    if lines.bad and (path, tuple(lines.bad)) not in _said_damaged:  # once per damage, not per read
        _said_damaged.add((path, tuple(lines.bad)))
        say_damaged(
            path,
            lines.bad,
            "are not result records and were skipped (a damaged file; "
            "their runs count as not done: the next sweep retrains them and rewrites the file)",
        )
    return lines.records


_said_damaged: set[tuple[str, tuple[int, ...]]] = set()


def append_result(runs_dir: str, record: dict[str, Any]) -> None:
    """Add ``record`` (replacing any earlier record of the same run) atomically."""
    kept = [r for r in read_results(runs_dir) if r["run"] != record["run"]]
    kept.append(record)
    _write_results(runs_dir, kept)


def _write_results(runs_dir: str, records: list[dict[str, Any]]) -> None:
    """results.jsonl of ``runs_dir`` := ``records``, one JSON line each, atomically."""
    from torchpeer.data.atomic import write_text_atomic

    write_text_atomic(results_path(runs_dir), "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


RUN_RECORD_FILES = ("config.json", "summary.json")  # copied as they are; the metrics log is compressed


def copy_results(runs_dir: str, dest: str) -> int:
    """Copy results.jsonl and, per recorded run, its small record files (RUN_RECORD_FILES) and its
    metrics log into ``dest`` (dest/results.jsonl, dest/<run>/...), atomically per file: a folder to
    commit that outlives the machine the runs trained on. Checkpoints and job logs are left out. The metrics
    log is written as metrics.jsonl.xz (~4x smaller: the committed folders travel with every device
    command, whose copy of the tree is capped); a plain metrics.jsonl left in dest by an older copy is
    removed, so a run folder holds one form. Returns the runs copied."""
    import shutil

    from torchpeer.data.atomic import atomic_open

    records = read_results(runs_dir)
    if os.path.abspath(runs_dir) == os.path.abspath(dest):
        return len(records)
    for rec in records:
        for name in RUN_RECORD_FILES:
            src = os.path.join(runs_dir, rec["run"], name)
            if os.path.exists(src):
                with open(src, "rb") as fin, atomic_open(os.path.join(dest, rec["run"], name), "wb") as fout:
                    shutil.copyfileobj(fin, fout)
        if (src := run_metrics_path(os.path.join(runs_dir, rec["run"]))) is not None:
            _copy_metrics_xz(src, os.path.join(dest, rec["run"]))
    _write_results(dest, records)
    return len(records)


def _copy_metrics_xz(src: str, run_dest: str) -> None:
    """RUN_DEST/metrics.jsonl.xz := the log ``src`` (compressed; an .xz source is copied as it is);
    then RUN_DEST's plain metrics.jsonl, if any, is removed."""
    write_xz_copy(src, os.path.join(run_dest, METRICS_XZ))
    plain = os.path.join(run_dest, METRICS_FILE)
    if os.path.exists(plain):
        os.remove(plain)


def make_record(run, summary: dict[str, Any], sweep, wall_seconds: float | None = None) -> dict[str, Any]:
    """The results line of a finished ``PlannedRun`` from the trainer's summary."""
    seconds = summary.get("train_seconds") or 0.0
    tokens = summary["tokens"]
    model = run.cfg.model
    record = {
        "run": run.name,
        "sweep": sweep.name,
        "variant": run.variant,
        "seed": run.cfg.train.seed,
        "ffw": model.ffw,
        "budget_flops": run.budget_flops,
        "token_budget": run.token_budget,
        "total_params": summary["total_params"],
        "active_params": summary["active_params"],
        "train_flops_per_token": summary.get("train_flops_per_token", run.train_flops_per_token),
        "steps": summary["steps"],
        "tokens": tokens,
        "train_flops": summary["train_flops"],
        "train_seconds": seconds,
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "wall_seconds": round(wall_seconds, 2) if wall_seconds is not None else None,
        "memory": summary.get("memory"),  # the step's memory estimate beside the GPU's peak (calibration)
        "valid": {name: _eval_entry(r) for name, r in (summary.get("valid") or {}).items()},
        "overrides": run.overrides,
        "model": {
            "d_model": model.d_model,
            "n_layers": model.n_layers,
            "n_heads": model.n_heads,
            "seq_len": model.seq_len,
            "placement": model.placement,
            model.ffw: _section(model, model.ffw),
        },
        **spec_labels(run, sweep),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_version(),
    }
    return record


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """What trained a run: ``commit`` (the environment's TORCHPEER_COMMIT, which
    scripts/device_sweep.sh sets from the snapshot it runs, else ``git rev-parse`` of the checkout
    that holds this package, else None) and the torch and triton versions. Runs of one sweep may
    span commits (a kernel replaced between GPU jobs): the report's readers can tell them apart."""
    import torch

    commit = os.environ.get("TORCHPEER_COMMIT") or None
    if commit is None:
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
            )
            commit = out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"commit": commit or None, "torch": torch.__version__, "triton": triton_version}


def make_run_record(run, summary: dict[str, Any], sweep, wall_seconds: float | None = None) -> dict[str, Any]:
    """The results line of a finished run: ``make_record`` plus its epoch fields."""
    rec = make_record(run, summary, sweep, wall_seconds=wall_seconds)
    return {**rec, **epoch_fields(run, tokens=rec["tokens"])}


def spec_labels(run, sweep) -> dict[str, Any]:
    """The fields of a results line that the spec gives and training does not: which report sections
    a run is in and where (kind, family, ranking eval set, ablation axis and series), and the spec's
    data rule ``max_epochs`` when it has one (so that the report knows the rule without the spec;
    lines of a spec without a rule stay as they were)."""
    labels = {
        "kind": sweep.kind,
        "family": run.family,
        "eval_set": sweep.eval_set or next(iter(run.cfg.data.valid), None),
        "x_field": sweep.x,
        "x": run.x,
        "series_field": sweep.series,
        "series": run.series,
    }
    if getattr(sweep, "max_epochs", None) is not None:
        labels["max_epochs"] = sweep.max_epochs
    return labels


def relabel(record: dict[str, Any], run, sweep) -> list[str]:
    """Give a recorded run's line the spec's labels now (spec_labels), in place; returns the fields
    that changed. A spec edited after its runs trained (kind = "ablation" with x = "train.lr" added to a
    grid) changes what the report shows without retraining; lines of another sweep that share the folder
    keep their own labels."""
    if record.get("sweep") != sweep.name:
        return []
    labels = spec_labels(run, sweep)
    changed = sorted(k for k in set(labels) | {"max_epochs"} if record.get(k) != labels.get(k))
    record.update(labels)
    if "max_epochs" not in labels:
        record.pop("max_epochs", None)
    return changed


def replace_results(runs_dir: str, records: list[dict[str, Any]]) -> None:
    """Rewrite results.jsonl with ``records`` in place of the lines of their runs (order kept)."""
    new = {r["run"]: r for r in records}
    _write_results(runs_dir, [new.get(r["run"], r) for r in read_results(runs_dir)])


def breaks_epoch_rule(epochs: float | None, max_epochs: float | None) -> bool:
    """True when a run's ``epochs`` exceed the data rule ``max_epochs``; False without a rule or
    when the epochs are unknown (a train split not tokenised yet: nothing to judge)."""
    return max_epochs is not None and epochs is not None and epochs > max_epochs


def epochs_cell(epochs: float | None) -> str:
    """1.2849 -> "1.28", 0.0012 -> "0.0012" (a short run's epochs are not 0.00), None -> "-"."""
    if epochs is None:
        return "-"
    return f"{epochs:.2g}" if 0 < abs(epochs) < 0.01 else f"{epochs:.2f}"


def epochs_text(max_epochs: float) -> str:
    """4.0 -> "4", 2.5 -> "2.5": the rule as the spec writes it."""
    return f"{max_epochs:g}"


def data_key(data_cfg) -> str:
    """One data config as a string: runs with equal keys read the same token files."""
    import dataclasses

    return json.dumps(dataclasses.asdict(data_cfg), sort_keys=True, default=str)


def epoch_fields(run, memo: dict | None = None, tokens: int | None = None) -> dict[str, Any]:
    """``train_split_tokens`` (one pass over the train split; None when not tokenised yet) and
    ``epochs`` (the run's tokens over it): the isoFLOP protocol caps repeats of the corpus.
    ``memo``: a dict reused across the runs of one listing (the cache is looked up once per data config);
    ``tokens``: the tokens the run trained on (default: the plan's)."""
    from torchpeer.experiments.data_prep import cached_train_tokens

    key = data_key(run.cfg.data)
    memo = {} if memo is None else memo
    if key not in memo:
        memo[key] = cached_train_tokens(run.cfg.data)
    n = memo[key]
    tokens = run.tokens if tokens is None else tokens
    return {"train_split_tokens": n, "epochs": None if not n else round(tokens / n, 3)}


def _section(model, kind: str) -> dict[str, Any]:
    import dataclasses

    sec = getattr(model, kind, None)
    return dataclasses.asdict(sec) if dataclasses.is_dataclass(sec) else {}


def _eval_entry(r: dict[str, Any]) -> dict[str, Any]:
    usage = {
        layer: {k: u[k] for k in ("usage_pct", "kl") if k in u}
        for layer, u in (r.get("usage") or {}).items()
        if isinstance(u, dict)
    }
    entry = {k: r[k] for k in ("loss", "ppl", "bpb", "tokens") if k in r}
    entry["usage"] = usage
    if isinstance(r.get("routing"), dict):  # routing diagnostics, where the trainer reports them
        entry["routing"] = r["routing"]
    return entry


def seed_of(record: dict[str, Any]) -> int:
    """The run's train.seed (older records without the field: from their overrides, else 0)."""
    seed = record.get("seed")
    if seed is None:
        seed = (record.get("overrides") or {}).get("train.seed", 0)
    return int(seed)


def primary_loss(record: dict[str, Any]) -> float | None:
    """Loss on the record's ranking eval set (None when it has none)."""
    entry = (record.get("valid") or {}).get(record.get("eval_set"))
    return entry.get("loss") if entry else None


def primary_ppl(record: dict[str, Any]) -> float | None:
    """Perplexity on the record's ranking eval set (None when it has none)."""
    entry = (record.get("valid") or {}).get(record.get("eval_set"))
    return entry.get("ppl") if entry else None


def routed_usage(record: dict[str, Any], eval_set: str | None = None) -> tuple[float | None, float | None]:
    """(usage %, KL) on ``eval_set`` (default: the ranking eval set), averaged over the routed layers
    (None if there are none)."""
    entry = (record.get("valid") or {}).get(eval_set or record.get("eval_set")) or {}
    return _mean_usage(u for u in (entry.get("usage") or {}).values() if "usage_pct" in u)


def pool_usage(record: dict[str, Any], eval_set: str | None = None) -> tuple[float | None, float | None]:
    """(usage %, KL) of the shared expert pools on ``eval_set`` (default: the ranking eval set): the
    union over the layers that read a pool (the eval stores each pool in "routing" with its
    "layers"), averaged over the pools; (None, None) for a model without a shared pool."""
    entry = (record.get("valid") or {}).get(eval_set or record.get("eval_set")) or {}
    routing = (entry.get("routing") or {}).values()
    return _mean_usage(u for u in routing if isinstance(u, dict) and "layers" in u and "usage_pct" in u)


# rows.csv: one row per (run, eval set), the long format for analysis outside the report
EVAL_ROW_FIELDS = (
    "sweep", "run", "family", "variant", "seed", "tokens", "epochs", "steps", "train_flops",
    "train_flops_per_token", "active_params", "total_params", "tokens_per_s", "eval_set", "ranking",
    "eval_tokens", "loss", "ppl", "bpb", "usage_pct", "kl", "pool_usage_pct", "pool_kl", "commit", "final",
)  # fmt: skip


def eval_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per (run, eval set) with EVAL_ROW_FIELDS: the run's size, tokens, FLOPs and speed,
    and on that eval set its loss, ppl, bits per byte, mean routed usage % / KL and (shared pools)
    the pool's union usage % / KL. ``ranking`` is True for the set the report ranks runs by; ``final``
    is False for an evaluation made during training (a record of ``eval_history.records_during_training``:
    its tokens, steps, epochs and FLOPs are those of that step)."""
    rows = []
    for r in records:
        for name, entry in sorted((r.get("valid") or {}).items()):
            row = {k: r.get(k) for k in EVAL_ROW_FIELDS}  # the run's own fields; the rest per eval set
            row["usage_pct"], row["kl"] = routed_usage(r, name)
            row["pool_usage_pct"], row["pool_kl"] = pool_usage(r, name)
            row.update(
                seed=seed_of(r),
                eval_set=name,
                ranking=name == r.get("eval_set"),
                eval_tokens=entry.get("tokens"),
                loss=entry.get("loss"),
                ppl=entry.get("ppl"),
                bpb=entry.get("bpb"),
                commit=(r.get("code") or {}).get("commit"),
                final=not r.get("during_training", False),
            )
            rows.append(row)
    return rows


def eval_rows_csv(records: list[dict[str, Any]]) -> str:
    """eval_rows as CSV text (header first; empty cells for missing values)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EVAL_ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in eval_rows(records):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _mean_usage(entries) -> tuple[float | None, float | None]:
    """(mean usage_pct, mean kl over the entries that have one) of {"usage_pct", "kl"} entries;
    (None, None) for none."""
    entries = list(entries)
    if not entries:
        return None, None
    kls = [u["kl"] for u in entries if "kl" in u]
    return sum(u["usage_pct"] for u in entries) / len(entries), (sum(kls) / len(kls) if kls else None)


def short_count(n) -> str:
    """A parameter count, short: 10.3k, 2.88M, 1.1B ("-" for None)."""
    if n is None:
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
