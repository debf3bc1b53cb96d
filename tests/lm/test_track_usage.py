"""train.track_usage: each log window's expert usage % and KL over its training tokens (a metrics
line's "routing"), so a router's collapse shows when it happens; an evaluation in the middle of a
window does not end it; ``torchpeer plot`` reads the windows as the "train" curves."""

import math

import pytest
import torch

from tests.lm.test_eval_pool_usage import SEQ, N, force_routing, shared_lm
from torchpeer.diagnostics import ExpertUsage, RoutingStats, UsageTrackingMixin, enable_usage_tracking, window_usage


def test_a_window_counts_what_its_forwards_selected_and_the_next_starts_empty():
    model = shared_lm(shared=False)
    force_routing(model.blocks[0].ffw.router, 0, 16)  # layer 0: experts 0..15, evenly
    force_routing(model.blocks[2].ffw.router, 8, 32)  # layer 2: experts 8..39, evenly
    assert enable_usage_tracking(model, True, full=False) == 2
    assert type(model.blocks[0].ffw.usage_tracker) is ExpertUsage  # usage and KL only: cheap
    x = torch.randint(0, 50, (2, SEQ))
    model(x)
    model(x)  # two forwards, one window
    w = window_usage(model)
    assert set(w) == {"blocks.0.ffw", "blocks.2.ffw"}
    assert w["blocks.0.ffw"]["usage_pct"] == pytest.approx(100 * 16 / N)
    assert w["blocks.0.ffw"]["kl"] == pytest.approx(math.log(N / 16), abs=1e-12)  # uniform over 16 experts
    assert w["blocks.2.ffw"]["usage_pct"] == pytest.approx(100 * 32 / N)
    assert window_usage(model) == {}  # a new window, nothing seen yet: no entry rather than a 0 %
    model(x[:1])
    assert window_usage(model)["blocks.2.ffw"]["usage_pct"] == pytest.approx(100 * 32 / N)
    enable_usage_tracking(model, True)
    assert type(model.blocks[0].ffw.usage_tracker) is RoutingStats  # the evaluation's full statistics


def test_the_trainer_logs_windows_and_an_evaluation_keeps_the_training_window(tmp_path):
    from tests.lm.helpers import records, write_config, write_corpus
    from torchpeer.lm.config_io import load_config
    from torchpeer.lm.trainer import Trainer
    from torchpeer.viz.metrics import read_metrics

    write_corpus(tmp_path, train_lines=300, valid_lines=40)
    flags = ["--train.max_steps", "6", "--train.log_interval", "2", "--train.eval_interval", "3"]
    flags += ["--train.checkpoint", "false", "--train.track_usage", "true"]
    trainer = Trainer(load_config(write_config(tmp_path), flags), str(tmp_path / "run"), progress=False).build()
    layer = next(m for m in trainer.model.modules() if isinstance(m, UsageTrackingMixin))  # the PEER layer
    seen = []
    real_evaluate = trainer.evaluate

    def evaluate(*a, **kw):  # the step-3 evaluation falls inside the window of steps 3-4
        def mass():  # the window's selections so far (None right after a log step, as at the final one)
            scores = layer.usage_tracker.scores
            return None if scores is None else scores.clone()

        before, held = layer.usage_tracker, mass()
        out = real_evaluate(*a, **kw)
        seen.append((before, layer.usage_tracker, held, mass()))
        return out

    trainer.evaluate = evaluate
    trainer.fit()
    before, after, mass, mass_after = seen[0]
    assert type(before) is ExpertUsage and after is before  # the training window's tracker is back
    assert torch.equal(mass, mass_after) and mass.sum() > 0  # and holds what it held: not emptied, not added to
    logged = [r for r in records(tmp_path / "run") if "loss" in r and "eval" not in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    for r in logged:
        (name, u), *more = r["routing"].items()
        assert not more and name.endswith("ffw") and 0 < u["usage_pct"] <= 100 and u["kl"] >= 0
        # a window of 2 steps x 8 x 32 tokens x 2 heads x top-4 selections out of 64 experts: most are seen
        assert u["usage_pct"] >= 50
    curves = read_metrics(str(tmp_path / "run")).routing[("train", name)]
    assert curves["usage_pct"].steps == [2, 4, 6]
    assert curves["usage_pct"].values == pytest.approx([r["routing"][name]["usage_pct"] for r in logged])


def test_without_the_option_nothing_is_tracked_in_training(tmp_path):
    from tests.lm.helpers import records, write_config, write_corpus
    from torchpeer.lm.config_io import load_config
    from torchpeer.lm.train import train

    write_corpus(tmp_path, train_lines=300, valid_lines=40)
    flags = ["--train.max_steps", "2", "--train.checkpoint", "false"]
    train(load_config(write_config(tmp_path), flags), str(tmp_path / "run"), progress=False)
    assert not any("routing" in r for r in records(tmp_path / "run") if "eval" not in r)
