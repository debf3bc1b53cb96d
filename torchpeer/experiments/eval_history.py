"""What a run's metrics.jsonl (or its committed metrics.jsonl.xz) says beyond its results line: the
evaluations it made during training (``train.eval_interval``: perplexity, usage and KL on the ranking
eval set at each evaluated step; ``during_table`` makes the report's table of them), and its
train-valid gap (``train_valid_gaps``, ``gap_table``: the final valid loss less the training loss of
the run's last tenth)."""

from __future__ import annotations

import math
import os

from torchpeer.experiments.markdown import fmt, table
from torchpeer.experiments.results import primary_loss, short_count


def evals_during_training(recs: list[dict], runs_dir: str) -> list[dict]:
    """One dict (run, step, tokens, epochs, ppl, usage_pct, kl; None where unknown) per evaluation
    in the runs' metrics.jsonl on their ranking eval set, for the runs evaluated more than once (a
    spec's ``train.eval_interval``); [] when none was (the runs table already holds the final values).
    usage_pct and kl: the mean over the routed layers; epochs: tokens over the run's train split."""
    from torchpeer.viz.metrics import read_metrics_if_logged

    def by_step(series) -> dict:
        return dict(zip(series.steps, series.values)) if series else {}

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    rows = []
    for r in recs:
        if (m := read_metrics_if_logged(os.path.join(runs_dir, r["run"]))) is None:
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


def records_during_training(recs: list[dict], runs_dir: str) -> list[dict]:
    """``recs`` with, before each run's record, a copy of it per evaluation its metrics.jsonl holds
    from before the end (``train.eval_interval``), marked ``"during_training": True``, whose ``valid``
    is that evaluation (every eval set it made) and whose steps, tokens, epochs and train_flops are
    those of its step. So the report's rows.csv has a row per (run, tokens, eval set): issue 18's
    "usage and KL after 30M tokens" is a row, not a line of a run's log."""
    from torchpeer.jsonl import read_json_lines, run_metrics_path

    out = []
    for r in recs:
        path = run_metrics_path(os.path.join(runs_dir, r["run"]))
        steps, tokens = r.get("steps"), r.get("tokens")
        if path is not None and steps and tokens:
            per_step, split = tokens / steps, r.get("train_split_tokens")
            # cut or damaged lines are skipped (read_metrics, which the report reads first, says them)
            for e in read_json_lines(path, accept=lambda rec: "eval" in rec).records:
                step = e.get("step")
                if not isinstance(e.get("eval"), dict) or not isinstance(step, int) or not 0 < step < steps:
                    continue
                t = round(step * per_step)
                flops = t * r["train_flops_per_token"] if r.get("train_flops_per_token") else None
                out.append({**r, "valid": e["eval"], "steps": step, "tokens": t, "train_flops": flops,
                            "epochs": t / split if split else None, "during_training": True})  # fmt: skip
        out.append(r)
    return out


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


def train_valid_gaps(recs: list[dict], runs_dir: str, tail: float = 0.1) -> list[dict]:
    """One dict (run, train_loss, valid_loss, gap) per run whose metrics.jsonl has logged training
    losses: ``train_loss`` is the mean of the logged losses over the last ``tail`` of its steps,
    ``valid_loss`` the results line's loss on the ranking eval set, ``gap`` = valid_loss - train_loss.

    Why: the training sampler draws windows at random offsets, so late in a run much of each batch
    was seen before; a design whose training loss falls further than its valid loss stores seen
    text (the expert tables can) rather than learning what transfers. Runs without logged losses or
    without a valid loss are left out."""
    from torchpeer.viz.metrics import read_metrics_if_logged

    rows = []
    for r in recs:
        valid = primary_loss(r)
        m = read_metrics_if_logged(os.path.join(runs_dir, r["run"]))
        losses = m.train.get("loss") if m is not None else None
        if valid is None or not losses or not losses.steps:
            continue
        last = losses.steps[-1]
        window = [v for s, v in zip(losses.steps, losses.values) if s > last * (1 - tail)] or [losses.values[-1]]
        train = sum(window) / len(window)
        rows.append({"run": r["run"], "train_loss": train, "valid_loss": valid, "gap": valid - train})
    return rows


def gap_table(gaps: list[dict]) -> list[str]:
    """The rows of ``train_valid_gaps`` as a table (losses in nats)."""
    rows = [[g["run"], fmt(g["train_loss"], ".4f"), fmt(g["valid_loss"], ".4f"), fmt(g["gap"], ".4f")] for g in gaps]
    return table(["run", "train loss (last 10 %)", "valid loss", "gap"], rows, right_from=1)
