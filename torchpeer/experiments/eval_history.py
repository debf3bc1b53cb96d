"""The evaluations a run made during training (``train.eval_interval``), read from its metrics.jsonl:
perplexity, usage and KL on the ranking eval set at each evaluated step (the results line holds
only the final evaluation). ``during_table`` makes the report's table of them."""

from __future__ import annotations

import math
import os

from torchpeer.experiments.markdown import fmt, table
from torchpeer.experiments.results import short_count


def evals_during_training(recs: list[dict], runs_dir: str) -> list[dict]:
    """One dict (run, step, tokens, epochs, ppl, usage_pct, kl; None where unknown) per evaluation
    in the runs' metrics.jsonl on their ranking eval set, for the runs evaluated more than once (a
    spec's ``train.eval_interval``); [] when none was (the runs table already holds the final values).
    usage_pct and kl: the mean over the routed layers; epochs: tokens over the run's train split."""
    from torchpeer.viz.metrics import read_metrics

    def by_step(series) -> dict:
        return dict(zip(series.steps, series.values)) if series else {}

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
        ppl = by_step(curves.get("ppl"))
        layers = [c for (set_name, _), c in m.routing.items() if set_name == r.get("eval_set")]
        usage = [by_step(c.get("usage_pct")) for c in layers]
        kl = [by_step(c.get("kl")) for c in layers]
        split = r.get("train_split_tokens")
        for step, loss in zip(curves["loss"].steps, curves["loss"].values):
            tokens = m.tokens_at(step)
            rows.append({
                "run": r["run"], "step": step, "tokens": tokens,
                "epochs": tokens / split if tokens and split else None,
                "ppl": ppl.get(step, math.exp(loss)),
                "usage_pct": mean(u.get(step) for u in usage), "kl": mean(k.get(step) for k in kl),
            })  # fmt: skip
    return rows


def during_table(during: list[dict]) -> list[str]:
    """The rows of ``evals_during_training`` as a table (blank where the tokens are unknown)."""
    rows = [
        [
            e["run"], str(e["step"]), short_count(e["tokens"]) if e["tokens"] else "",
            fmt(e["epochs"], ".2f") if e["epochs"] is not None else "", fmt(e["ppl"], ".2f"),
            fmt(e["usage_pct"], ".1f"), fmt(e["kl"], ".3f"),
        ]
        for e in during
    ]  # fmt: skip
    return table(["run", "step", "tokens", "epochs", "ppl", "usage %", "KL"], rows, right_from=1)
