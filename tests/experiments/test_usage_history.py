"""The report's "Expert usage during training" section, from runs that logged each window's usage
(train.track_usage): the table at fixed fractions of each run's steps, the lowest window and where it
fell, the final KL; a figure; nothing when no run logged windows."""

import json
import os

import pytest

from tests.experiments.test_report import load_png, rec, valid
from torchpeer.experiments import append_result
from torchpeer.experiments.report import write_report
from torchpeer.experiments.usage_history import at_fraction, usage_during_training


def logged_run(d, name: str, usage_by_layer: dict[str, list[float]], steps: int = 100, interval: int = 10):
    """A run folder whose metrics.jsonl holds a window every ``interval`` steps with the given usage
    per layer (KL = usage / 100, to tell them apart), and its results record."""
    r = rec(name, family="peer", budget_flops=1e15, active_params=1e6, steps=steps, valid=valid(3.0, 50.0, 1.0))
    append_result(str(d), r)
    (d / name).mkdir(parents=True)
    with open(d / name / "metrics.jsonl", "w") as fh:
        fh.write(json.dumps({"step": 0, "event": "start", "tokens_per_step": 1000}) + "\n")
        for i, step in enumerate(range(interval, steps + 1, interval)):
            routing = {layer: {"usage_pct": u[i], "kl": u[i] / 100} for layer, u in usage_by_layer.items()}
            fh.write(json.dumps({"step": step, "tokens": step * 1000, "loss": 3.0, "routing": routing}) + "\n")


def test_windows_are_averaged_over_layers_and_read_at_fractions_of_the_steps(tmp_path):
    d = tmp_path / "runs"
    falls = [90, 70, 40, 30, 30, 35, 40, 45, 50, 50]  # collapses early, climbs back a little
    logged_run(d, "peer-s0-1e15", {"blocks.1.ffw": falls, "blocks.3.ffw": [u + 10 for u in falls]})
    logged_run(d, "flat-s1-1e15", {"blocks.2.ffw": [80.0] * 10})
    h, flat = usage_during_training(_records(d), str(d))
    assert h["run"] == "peer-s0-1e15" and h["steps"] == list(range(10, 101, 10))
    assert h["usage"] == pytest.approx([u + 5 for u in falls]) and h["tokens"][0] == 10_000
    assert at_fraction(h, 0.05) == pytest.approx(95) and at_fraction(h, 0.25) == pytest.approx(45)  # step 30
    assert at_fraction(h, 1.0) == pytest.approx(55) and flat["usage"] == [80.0] * 10
    written = write_report(str(d))
    section = open(written["report"]).read().split("### Expert usage during training")[1]
    row = next(line for line in section.splitlines() if line.startswith("| peer-s0-1e15"))
    assert row == "| peer-s0-1e15 | 95.0 | 75.0 | 45.0 | 35.0 | 55.0 | 35.0 (40 %) | 0.550 |"
    assert "![usage-study](usage-study.png)" in section
    png = os.path.join(os.path.dirname(written["report"]), "usage-study.png")
    assert load_png(png).std() > 0  # a drawn figure, not a blank one


def test_no_section_without_logged_windows(tmp_path):
    d = tmp_path / "runs"
    append_result(str(d), rec("dense-s0-1e15", family="dense", budget_flops=1e15, active_params=1e6, valid=valid(3.0)))
    assert usage_during_training(_records(d), str(d)) == []
    assert "Expert usage during training" not in open(write_report(str(d))["report"]).read()


def _records(d):
    from torchpeer.experiments.results import read_results

    return read_results(str(d))
