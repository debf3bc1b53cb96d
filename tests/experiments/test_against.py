"""`torchpeer report RUNS --against OTHER`: runs of the same name in two sweeps (a study re-run with
one setting changed) set side by side: each twin's loss difference, each family's best seed-0 run per
budget in both, and whether the order of the families changed."""

import pytest

from tests.experiments.test_report import rec, valid
from torchpeer.experiments import append_result
from torchpeer.experiments.against import against_lines
from torchpeer.experiments.report import write_report


def study(losses: dict[str, float], lr: float | None = None, seed1: dict[str, float] | None = None) -> list[dict]:
    """Records of a tiny isoFLOP study: run name -> loss at budget 1e15 (family = the name's first part)."""
    over = {} if lr is None else {"train.lr": str(lr)}
    return [
        rec(
            name,
            family=name.split("-")[0],
            budget_flops=1e15,
            seed=seed,
            valid=valid(loss),
            overrides=over,
            active_params=10**6 * (2 if "-s2" in name else 1),
        )
        for seed, runs in ((0, losses), (1, seed1 or {}))
        for name, loss in runs.items()
    ]


def test_twins_differences_best_runs_and_the_order_of_families():
    there = study({"dense-s1": 4.0, "dense-s2": 3.9, "peer-s1": 3.95, "peer-s2": 3.85, "pkm-s2": 4.2})
    here = study(
        {"dense-s1": 3.5, "dense-s2": 3.6, "peer-s1": 3.7, "peer-s2": 3.65, "moe-s2": 3.4},
        lr=4e-3,
        seed1={"dense-s1-seed1": 3.0},  # a seed run: never a family's best (seed 0 only)
    )
    lines = against_lines(here, there, "lrw", "iso")
    text = "\n".join(lines)
    assert lines[0].startswith("4 runs with a twin of the same name in iso")  # moe and pkm have no twin
    row = next(line for line in lines if line.startswith("| dense-s1 |"))
    assert row == "| dense-s1 | dense | 0.004 | base | 3.5000 | 4.0000 | -0.5000 |"
    assert "| peer-s2 | peer | 0.004 | base | 3.6500 | 3.8500 | -0.2000 |" in text
    best = next(line for line in lines if line.startswith("| 1e+15 | dense |"))
    assert "| dense-s1 | 3.5000 | dense-s2 | 3.9000 | -0.4000 |" in best  # the best sizes differ
    # families in both sweeps only; here dense < peer, there peer < dense
    assert "- 1e+15: lrw: dense < peer; iso: peer < dense (**the order changes**)." in lines
    assert against_lines(here, study({"other": 1.0}), "a", "b") == []


def test_warm_up_columns_appear_only_where_the_twins_differ_in_it():
    """isoflop-lrw's runs warm up for 15 % of their steps, the isoflop study's for 5 %: the twins' table
    then shows both warm-ups (steps and share), so the difference is not read as the lr's alone."""
    here = study({"dense-s1": 3.5, "peer-s1": 3.7}, lr=4e-3)
    there = study({"dense-s1": 4.0, "peer-s1": 3.9})
    assert not any("warm-up" in line for line in against_lines(here, there, "lrw", "iso"))
    for r in here:
        r["overrides"]["train.warmup_steps"], r["steps"] = "150", 1000
    for r in there:
        r["overrides"] = {"train.warmup_steps": "50"}
        r["steps"] = 1000
    lines = against_lines(here, there, "lrw", "iso")
    assert "| run | family | lr (lrw) | lr (iso) | warm-up (lrw) | warm-up (iso) |" in lines[2]
    row = next(line for line in lines if line.startswith("| dense-s1 |"))
    assert row == "| dense-s1 | dense | 0.004 | base | 150 (15 %) | 50 (5 %) | 3.5000 | 4.0000 | -0.5000 |"


def test_report_against_another_runs_folder(tmp_path):
    here_dir, there_dir = tmp_path / "isoflop-lrw", tmp_path / "isoflop"
    for d, recs in ((here_dir, study({"dense-s2": 3.5, "peer-s2": 3.6}, lr=4e-3)),
                    (there_dir, study({"dense-s2": 4.3, "peer-s2": 4.2}))):  # fmt: skip
        for r in recs:
            append_result(str(d), r)
    out = tmp_path / "report"
    write_report(str(here_dir), str(out), against=str(there_dir))
    md = (out / "report.md").read_text()
    assert f"## Against {there_dir}" in md
    assert "| dense-s2 | dense | 0.004 | base | 3.5000 | 4.3000 | -0.8000 |" in md
    assert "lr (isoflop-lrw)" in md and "- 1e+15: isoflop-lrw: dense < peer; isoflop: peer < dense" in md
    with pytest.raises(ValueError, match="no results.jsonl there"):
        write_report(str(here_dir), str(out), against=str(tmp_path / "nowhere"))


def test_a_run_beyond_the_data_rule_is_never_a_familys_best():
    """As in the report's own "best run": a run with more epochs than its sweep's max_epochs (the
    isoflop study's over-4-epoch check runs) is left out of the best runs; without a rule it counts."""
    here = study({"dense-s2": 3.6, "peer-s2": 3.5})
    there = study({"dense-s2": 3.9, "peer-s2": 3.8, "dense-s1": 3.0})
    there[-1]["epochs"] = 5.0  # dense-s1: best of dense, but beyond a 4-epoch rule
    ruled = "\n".join(against_lines(here, there, "a", "b", rules=(4.0, 4.0)))
    assert "| 1e+15 | dense | dense-s2 | 3.6000 | dense-s2 | 3.9000 | -0.3000 |" in ruled
    free = "\n".join(against_lines(here, there, "a", "b"))
    assert "| 1e+15 | dense | dense-s2 | 3.6000 | dense-s1 | 3.0000 | +0.6000 |" in free
