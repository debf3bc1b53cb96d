"""Paired-by-seed ablation comparisons (torchpeer/experiments/paired.py) on synthetic records."""

import numpy as np
import pytest

from torchpeer.experiments.paired import paired_rows, paired_table, seed_spread, with_shared_points


def _rec(series, x, seed, losses):
    valid = {name: {"loss": v} for name, v in losses.items()}
    return {"run": f"{series}-{x}-s{seed}", "series": series, "x": x, "seed": seed, "eval_set": "all", "valid": valid}


def test_each_value_against_the_first_with_the_same_seed_over_every_eval_set():
    rng = np.random.default_rng(0)
    sets = ["all", "a", "b", "c"]
    recs = [_rec("ema", x, s, {k: float(rng.normal(3.0, 0.05)) for k in sets}) for x in (16, 64, 256) for s in (0, 1)]
    recs.append(_rec("ema", 1024, 2, {k: 3.0 for k in sets}))  # a seed the reference lacks: no pair
    recs.append(_rec("none", 16, 0, {k: 3.1 for k in sets}))  # a series with one value: no pair
    rows = paired_rows(recs)
    assert [(r["x"], r["seed"]) for r in rows] == [(64, 0), (64, 1), (256, 0), (256, 1)]
    by = {(r["series"], r["x"], r["seed"]): r for r in recs}
    for row in rows:
        a, b = by[("ema", row["x"], row["seed"])]["valid"], by[("ema", 16, row["seed"])]["valid"]
        d = [a[k]["loss"] - b[k]["loss"] for k in sets]
        assert row["ranking"] == pytest.approx(d[0])
        assert row["mean"] == pytest.approx(np.mean(d))
        assert row["favour"] == sum(v < 0 for v in d) and row["sets"] == 4
    spread = seed_spread(recs)
    assert ("ema", 1024) not in spread and ("none", 16) not in spread
    losses16 = [by[("ema", 16, s)]["valid"]["all"]["loss"] for s in (0, 1)]
    assert spread[("ema", 16)] == pytest.approx(max(losses16) - min(losses16))


def test_table_shows_each_seed_side_by_side_and_is_empty_without_pairs():
    recs = [
        _rec("ema", 16, 0, {"all": 3.00, "a": 3.20}),
        _rec("ema", 16, 1, {"all": 3.02, "a": 3.21}),
        _rec("ema", 64, 0, {"all": 2.99, "a": 3.25}),
        _rec("ema", 64, 1, {"all": 3.03, "a": 3.19}),
    ]
    lines = paired_table(recs)
    assert lines[0].startswith("| series | x - reference | seed 0: ranking set") and "seed 1:" in lines[0]
    assert lines[2] == "| ema | 64 - 16 | -0.0100 (1/2) | +0.0100 (1/2) | 0.0400 / 0.0200 |"
    assert paired_table(recs[:2]) == []


def _run(run, series, seed, **overrides):
    return {"run": run, "series": series, "seed": seed, "overrides": {"train.seed": seed, **overrides}}


def test_a_run_joins_every_line_whose_shared_overrides_it_matches():
    """Fig. 3's grid: heads varied at top-k 16, top-k varied at heads 8; h8-k16 is filed with heads."""
    recs = [_run(f"h{h}-k16", "heads", 0, heads=h, top_k=16) for h in (2, 8, 32)]
    recs += [_run(f"h8-k{k}", "top_k", 0, heads=8, top_k=k) for k in (4, 64)]
    recs.append(_run("h8-k64-seed1", "top_k", 1, heads=8, top_k=64))  # a second seed: train.seed not shared
    recs.append(_run("h2-k64", "other", 0, heads=2, top_k=64))  # on neither line
    recs.append(_run("h8-k16-lr", "lr", 0, heads=8, top_k=16, lr=2e-3))  # sets a field no other line's run sets
    out = with_shared_points(recs)
    assert out[: len(recs)] == recs
    added = [(r["run"], r["series"], r["shared_from"]) for r in out[len(recs) :]]
    assert added == [("h8-k16", "top_k", "heads")]  # h8-k16-lr on neither the heads nor the top-k line
    assert with_shared_points([r for r in recs if r["series"] == "heads"]) == recs[:3]  # one line: nothing added
