"""Paired-by-seed ablation comparisons (torchpeer/experiments/paired.py) on synthetic records."""

import numpy as np
import pytest

from torchpeer.experiments.paired import paired_rows, paired_table, seed_spread


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
