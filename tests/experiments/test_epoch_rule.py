"""The data rule (issue 17): [sweep] max_epochs. The spec checks it, the plan marks the runs beyond
it, results lines record it, and the report leaves those runs out of the isoFLOP fits and the best
runs, marks them in the runs table, draws them hollow and sets their loss against the fit."""

import math
import re

import numpy as np
import pytest

from tests.experiments.test_report import rec, valid
from torchpeer.experiments import append_result, parse_spec, plan_sweep, write_report
from torchpeer.experiments.fit import isoflop_fits, outside_fit_runs
from torchpeer.experiments.report_command import _max_epochs
from torchpeer.experiments.results import make_run_record
from torchpeer.experiments.runner import format_plan

TINY = {
    "sweep": {"base": "ptb-tiny", "budgets": [1e10], "kind": "isoflop"},
    "base": {
        "train.batch_size": 4,
        "train.warmup_steps": 1,
        "model.seq_len": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "data.tokenizer": "byte",
    },
    "grid": {"model.d_model": [16, 32, 64]},
}


def tiny(**sweep):
    return {**TINY, "sweep": {**TINY["sweep"], **sweep}}


def test_max_epochs_is_checked_with_what_to_write():
    assert parse_spec(tiny(max_epochs=4)).max_epochs == 4.0
    assert parse_spec(tiny(max_epochs=2.5)).max_epochs == 2.5
    assert parse_spec(tiny()).max_epochs is None  # absent: no rule
    for bad in (0, -1, "4", True, math.nan, math.inf, [4]):
        with pytest.raises(ValueError, match=re.escape("such as max_epochs = 4")):
            parse_spec(tiny(max_epochs=bad))


def test_plan_marks_the_runs_beyond_the_rule(tmp_path, monkeypatch):
    """With the train split's size known, runs with more epochs than max_epochs read '> N' and the
    line under the table names them; unknown epochs are said, not guessed."""
    spec = parse_spec(tiny(max_epochs=1))
    runs = plan_sweep(spec, str(tmp_path))
    tokens = sorted(r.tokens for r in runs)  # smaller models train on more tokens
    monkeypatch.setattr("torchpeer.experiments.data_prep.cached_train_tokens", lambda cfg: tokens[1])
    text = format_plan(spec, runs, [])
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("d_model=")}
    over = [r.name for r in runs if r.tokens > tokens[1]]
    assert len(over) == 1 and "> 1" in rows[over[0]]
    assert sum("> 1" in row for row in rows.values()) == 1
    assert "data rule max_epochs = 1: 1 run repeats the train split more than 1 times" in text
    assert text.rstrip().endswith(over[0])

    monkeypatch.setattr("torchpeer.experiments.data_prep.cached_train_tokens", lambda cfg: None)
    text = format_plan(spec, runs, [])
    assert "data rule max_epochs = 1: not checked: the train split is not tokenised yet" in text
    no_rule = format_plan(parse_spec(tiny()), runs, [])
    assert "data rule" not in no_rule and "> " not in no_rule


def test_results_lines_record_the_rule_only_when_the_spec_has_one(tmp_path):
    summary = {
        "steps": 3,
        "tokens": 384,
        "train_flops": 3.84e5,
        "train_seconds": 0.5,
        "total_params": 1234,
        "active_params": 1000,
        "valid": {},
    }
    for raw, want in ((tiny(max_epochs=4), 4.0), (tiny(), None)):
        spec = parse_spec(raw)
        line = make_run_record(plan_sweep(spec, str(tmp_path))[0], summary, spec)
        assert line.get("max_epochs") == want and ("max_epochs" in line) == (want is not None)
        assert "epochs" in line


SIZES = np.geomspace(4e6, 3e7, 5)
CHECK = 3e6  # a size left of the fitted ones, more epochs than the rule allows, loss below the curve


def parabola(p, floor=3.3, opt=6e6):
    return floor + 0.25 * (math.log10(p) - math.log10(opt)) ** 2


def isoflop_runs(max_epochs=4):
    """dense at 1e16: 5 sizes inside the rule on a parabola, and one check run beyond it whose loss
    is the lowest of all (0.05 below the curve): it must not become the best run nor move the fit."""
    extra = {} if max_epochs is None else {"max_epochs": max_epochs}
    out = [
        rec(
            f"dense-s{i}-1e16",
            family="dense",
            budget_flops=1e16,
            active_params=float(p),
            epochs=1.0 + i / 2,
            valid=valid(parabola(p)),
            **extra,
        )
        for i, p in enumerate(SIZES)
    ]
    out.append(
        rec(
            "dense-check-1e16",
            family="dense",
            budget_flops=1e16,
            active_params=CHECK,
            epochs=5.12,
            valid=valid(parabola(CHECK) - 0.05),
            **extra,
        )
    )
    return out


def test_the_fit_leaves_out_the_runs_beyond_the_rule():
    records = isoflop_runs()
    g = isoflop_fits(records, max_epochs=4)[("dense", 1e16)]
    assert [r["run"] for r in g["runs"]] == [f"dense-s{i}-1e16" for i in range(5)] and g["n_sizes"] == 5
    assert g["best"]["run"] != "dense-check-1e16"
    assert g["fit"].optimum_params == pytest.approx(6e6, rel=1e-6)  # the parabola's own vertex
    assert [r["run"] for r in outside_fit_runs(records, 4)] == ["dense-check-1e16"]
    everything = isoflop_fits(records)[("dense", 1e16)]  # no rule: every run, the check is the best
    assert everything["best"]["run"] == "dense-check-1e16" and outside_fit_runs(records, None) == []
    unknown = [{**r, "epochs": None} for r in records]  # epochs not recorded: nothing to judge
    assert len(isoflop_fits(unknown, max_epochs=4)[("dense", 1e16)]["runs"]) == 6


def test_report_marks_the_rule_and_sets_the_outside_run_against_the_fit(tmp_path):
    runs = tmp_path / "runs"
    for r in isoflop_runs():
        append_result(str(runs), r)
    written = write_report(str(runs), str(tmp_path / "rule"))
    md = open(written["report"]).read()
    check_row = next(line for line in md.splitlines() if line.startswith("| dense-check-1e16 |"))
    assert "| 5.12 (> 4, outside fit) |" in check_row
    assert "max_epochs = 4, the spec's, recorded in results.jsonl); 1 run breaks it" in md
    fit_row = next(line for line in md.splitlines() if line.startswith("| 1e+16 | dense |"))
    assert fit_row.startswith("| 1e+16 | dense | 5 | 6M |") and "dense-check" not in fit_row
    section = md[md.index("### Runs beyond 4 epochs (outside the fits)") :]
    line = next(x for x in section.splitlines() if "dense-check-1e16" in x)
    assert "3M active params, 5.12 epochs" in line
    assert "0.0500 below dense's fitted curve at its size (extrapolated left of the fitted sizes)" in line
    assert "below dense's best run inside the rule (dense-s1-1e16" in line
    assert "evidence that dense's optimum at this budget lies in the region the rule forbids" in line
    # --max-epochs none: the same runs without a rule, as before the field existed
    md_none = open(write_report(str(runs), str(tmp_path / "none"), max_epochs=None)["report"]).read()
    assert "outside" not in md_none.replace("optimum outside", "") and "Data rule" not in md_none
    assert next(x for x in md_none.splitlines() if x.startswith("| 1e+16 | dense |")).startswith(
        "| 1e+16 | dense | 6 |"
    )


def test_old_records_without_the_field_report_as_before(tmp_path):
    """Lines from before max_epochs carry none: the report is the one without a rule, byte for byte
    (but the time it was made); --max-epochs applies a rule to them."""
    old = tmp_path / "old"
    for r in isoflop_runs(max_epochs=None):
        append_result(str(old), r)
    md_old = open(write_report(str(old), str(tmp_path / "a"))["report"]).read()
    md_bare = open(write_report(str(old), str(tmp_path / "b"), max_epochs=None)["report"]).read()
    stamp = re.compile(r"\(\d{4}-\d\d-\d\d \d\d:\d\d UTC\)")
    flag = " --max-epochs none"  # the header names the flag; the rest is the same
    assert stamp.sub("", md_old) == stamp.sub("", md_bare).replace(flag, "") and "Data rule" not in md_old
    md_flag = open(write_report(str(old), str(tmp_path / "c"), max_epochs=4.0)["report"]).read()
    assert "(max_epochs = 4, given by --max-epochs); 1 run breaks it" in md_flag
    assert f"Made by `torchpeer report {old} --max-epochs 4` from 6 finished runs" in md_flag
    assert f"Made by `torchpeer report {old}` from 6" in md_old and "--max-epochs none` from 6" in md_bare


def test_isoflop_figure_draws_outside_runs_hollow_under_one_legend_entry():
    from torchpeer.experiments.figures import isoflop_plot

    records = isoflop_runs()
    fits, outside = isoflop_fits(records, max_epochs=4), outside_fit_runs(records, 4)
    fig = isoflop_plot(fits, "all", "active_params", outside, 4.0)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["dense", "> 4 epochs, outside fit"]
    assert handles[1].get_markerfacecolor() == "none"
    hollow = [ln for ln in ax.get_lines() if ln.get_marker() == "o" and ln.get_markerfacecolor() == "none"]
    xs = [x for ln in hollow for x in ln.get_xdata()]
    assert xs == [CHECK]  # the check run, and only it, is drawn hollow (the legend proxy has no points)
    filled = [
        x
        for ln in ax.get_lines()
        if ln.get_marker() == "o" and ln.get_markerfacecolor() != "none"
        for x in ln.get_xdata()
    ]
    assert CHECK not in filled and len(filled) == 5
    dotted = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert dotted and min(min(ln.get_xdata()) for ln in dotted) == pytest.approx(CHECK)  # the fit runs on to it
    plain = isoflop_plot(isoflop_fits(records), "all")  # no rule: no hollow marker, no legend entry
    assert plain.axes[0].get_legend_handles_labels()[1] == ["dense"]


def test_report_flag_parses_a_rule_none_or_recorded():
    import argparse

    assert _max_epochs("4") == 4.0 and _max_epochs("none") is None and _max_epochs("recorded") == "recorded"
    for bad in ("0", "-2", "four", "inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="e.g. --max-epochs 4"):
            _max_epochs(bad)


def test_a_short_runs_epochs_are_not_shown_as_zero():
    """The runs table and the dry run show epochs to two decimals, but a short run's (a CPU smoke
    sweep's 0.0012 epochs) with two significant digits rather than as 0.00."""
    from torchpeer.experiments.results import epochs_cell

    assert [epochs_cell(e) for e in (1.2849, 0.0012, 0.00999, 0.0, None)] == ["1.28", "0.0012", "0.01", "0.00", "-"]
