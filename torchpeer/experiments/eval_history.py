"""The evaluations a run made during training (``train.eval_interval``), read from its metrics.jsonl,
as a report table: perplexity, usage and KL on the ranking eval set at each evaluated step (the
results line holds only the final evaluation)."""

from __future__ import annotations

import math
import os

from torchpeer.experiments.results import short_count


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def evals_during_training(recs: list[dict], runs_dir: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows): a row (run, step, tokens, epochs, ppl, usage %, KL) for every evaluation in the runs'
    metrics.jsonl on their ranking eval set, for the runs evaluated more than once (a spec's
    ``train.eval_interval``); no rows when none was (the runs table already holds the final values).
    Usage and KL are the mean over the routed layers; epochs: tokens over the run's train split."""
    from torchpeer.viz.metrics import read_metrics

    def at(series, step):
        return dict(zip(series.steps, series.values)).get(step) if series else None

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    rows = []
    for r in recs:
        try:
            m = read_metrics(os.path.join(runs_dir, r["run"]))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue
        curves = m.evals.get(r.get("eval_set"), {})
        if len(getattr(curves.get("loss"), "steps", [])) < 2:
            continue
        layers = [c for (set_name, _), c in m.routing.items() if set_name == r.get("eval_set")]
        split = r.get("train_split_tokens")
        for step, loss in zip(curves["loss"].steps, curves["loss"].values):
            tokens = m.tokens_at(step)
            ppl = at(curves.get("ppl"), step)
            rows.append([
                r["run"], str(step), short_count(tokens) if tokens else "",
                fmt(tokens / split, ".2f") if tokens and split else "",
                fmt(ppl if ppl is not None else math.exp(loss), ".2f"),
                fmt(mean(at(c.get("usage_pct"), step) for c in layers), ".1f"),
                fmt(mean(at(c.get("kl"), step) for c in layers), ".3f"),
            ])  # fmt: skip
    return ["run", "step", "tokens", "epochs", "ppl", "usage %", "KL"], rows
