"""Runner bookkeeping with a stand-in trainer: finished runs are skipped, results.jsonl holds each
run once, a summary without a results line is recorded without training, a changed config is refused."""

import json
import os

import pytest

from tests.experiments.test_epoch_rule import TINY
from torchpeer.experiments import parse_spec, plan_sweep, read_results, run_sweep
from torchpeer.experiments.pool import not_started_message
from torchpeer.experiments.results import append_result, results_path
from torchpeer.experiments.runner import estimate_basis, estimate_seconds, format_plan

# test_epoch_rule's tiny isoFLOP spec on the CPU, at two budgets, dense and PEER at two widths
SPEC = {
    **TINY,
    "sweep": {**TINY["sweep"], "budgets": [1e10, 2e10]},
    "base": {**TINY["base"], "train.device": "cpu"},
    "grid": {"model.d_model": [16, 32], "model.ffw": ["dense", "peer"]},
}


class FakeTrainer:
    """Writes what torchpeer.lm.train writes that the runner reads (config.json, summary.json)."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, run_dir, resume=False, progress=True):
        self.calls.append((cfg.name, resume))
        os.makedirs(run_dir, exist_ok=True)
        cfg.model.vocab_size = 257
        with open(os.path.join(run_dir, "config.json"), "w") as fh:
            # the trainer adds records of its own next to the config sections; they are not config
            json.dump({**cfg.to_dict(), "backends": {"blocks.1.ffw": {"expert_mix": "torch"}}}, fh)
        tokens = cfg.train.batch_size * cfg.model.seq_len * 3
        summary = {
            "steps": 3,
            "tokens": tokens,
            "train_flops": tokens * 1000,
            "train_seconds": 0.5,
            "total_params": 1234,
            "active_params": 1000 + cfg.model.d_model,
            "train_flops_per_token": 1000,
            "valid": {
                "ptb": {
                    "loss": 2.0,
                    "ppl": 7.39,
                    "bpb": 1.2,
                    "tokens": 99,
                    "usage": {"blocks.1.ffw": {"usage_pct": 50.0, "kl": 0.7, "extra": 1}},
                }
            },
        }
        with open(os.path.join(run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh)
        return summary


@pytest.fixture
def fake_train(monkeypatch):
    fake = FakeTrainer()
    monkeypatch.setattr("torchpeer.lm.train", fake)
    return fake


def test_resume_skips_finished_runs(tmp_path, fake_train):
    spec = parse_spec(SPEC)
    msgs = []
    new = run_sweep(spec, str(tmp_path), progress=False, say=msgs.append)
    assert len(new) == 8 and len(fake_train.calls) == 8 and all(resume for _, resume in fake_train.calls)
    recs = read_results(str(tmp_path))
    assert [r["run"] for r in recs] == [r["run"] for r in new]
    r = recs[0]
    for key in ("variant", "ffw", "budget_flops", "total_params", "active_params", "tokens", "train_flops"):
        assert r[key] is not None, key
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / 0.5)
    assert r["valid"]["ptb"]["usage"] == {"blocks.1.ffw": {"usage_pct": 50.0, "kl": 0.7}}
    assert r["eval_set"] == "ptb" and r["kind"] == "isoflop"

    msgs.clear()
    assert run_sweep(spec, str(tmp_path), progress=False, say=msgs.append) == []
    assert len(fake_train.calls) == 8 and sum("done, skipped" in m for m in msgs) == 8

    # a run killed after its summary but before its results line: recorded, not retrained
    lines = open(results_path(str(tmp_path))).read().splitlines()
    with open(results_path(str(tmp_path)), "w") as fh:
        fh.write("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # last line cut mid-write
    msgs.clear()
    run_sweep(spec, str(tmp_path), progress=False, say=msgs.append)
    assert len(fake_train.calls) == 8 and any("recorded from its summary" in m for m in msgs)
    names = [r["run"] for r in read_results(str(tmp_path))]
    assert len(names) == 8 and len(set(names)) == 8


def test_only_and_changed_config(tmp_path, fake_train):
    spec = parse_spec(SPEC)
    run_sweep(spec, str(tmp_path), only="*peer-1e10", progress=False, say=lambda s: None)
    assert [c[0] for c in fake_train.calls] == ["d_model=16-ffw=peer-1e10", "d_model=32-ffw=peer-1e10"]
    changed = {**SPEC, "base": {**SPEC["base"], "train.lr": 0.5}}
    with pytest.raises(ValueError, match=r"trained with another config \(train.lr: was 0.002, now 0.5\)"):
        run_sweep(parse_spec(changed), str(tmp_path), only="*peer-1e10", progress=False, say=lambda s: None)


def test_dry_run_estimates_from_measured_tokens_per_s(tmp_path, fake_train):
    spec = parse_spec(SPEC)
    out = []
    run_sweep(spec, str(tmp_path), dry_run=True, say=out.append)
    assert fake_train.calls == [] and "unknown" in out[0] and "8 runs to train" in out[0]
    assert "--assume-tokens-per-s N estimates them" in out[0]  # says how to get an estimate
    # no run has an estimate: no "estimated 0 s" that reads as one
    assert "8 runs to train; no time estimate yet (no measured tokens/s;" in out[0]
    assert "estimated 0 s" not in out[0]
    assert not os.path.exists(results_path(str(tmp_path)))
    run_sweep(spec, str(tmp_path), only="*-1e10", progress=False, say=lambda s: None)
    out.clear()
    run_sweep(spec, str(tmp_path), dry_run=True, say=out.append)
    rows = {line.split()[0]: line for line in out[0].splitlines() if "-ffw=" in line}
    assert rows["d_model=16-ffw=dense-1e10"].rstrip().endswith("done")
    # measured: 384 tokens in 0.5 s -> 295,424 tokens of the 2e10 run in 385 s
    assert "295,424" in rows["d_model=16-ffw=dense-2e10"] and "6.4 min  todo" in rows["d_model=16-ffw=dense-2e10"]
    assert "runs to train; estimated " in out[0] and "no time estimate yet" not in out[0]  # some estimated
    out.clear()
    run_sweep(spec, str(tmp_path / "other"), dry_run=True, assume_tokens_per_s=1000.0, say=out.append)
    assert "~" in out[0] and "assumed 1,000" in out[0]


def test_damaged_results_lines_are_skipped_and_said_once(tmp_path, capsys):
    append_result(str(tmp_path), {"run": "a", "v": 1})
    with open(results_path(str(tmp_path)), "a", encoding="utf-8") as fh:
        fh.write('{"run": "b", "v"\n[1, 2]\n')  # a torn write, and JSON that is not a record
    assert [r["run"] for r in read_results(str(tmp_path))] == ["a"]
    err = capsys.readouterr().err
    assert "line(s) 2, 3 are not result records and were skipped" in err and "retrains them" in err
    read_results(str(tmp_path))
    assert capsys.readouterr().err == ""  # said once


def test_append_result_replaces_and_is_atomic(tmp_path):
    append_result(str(tmp_path), {"run": "a", "v": 1})
    append_result(str(tmp_path), {"run": "b", "v": 2})
    append_result(str(tmp_path), {"run": "a", "v": 3})
    assert [(r["run"], r["v"]) for r in read_results(str(tmp_path))] == [("b", 2), ("a", 3)]
    assert [f for f in os.listdir(tmp_path) if f != "results.jsonl"] == []  # no temp files left


def test_time_limit_starts_no_run_that_would_not_finish(tmp_path, fake_train, monkeypatch):
    spec = parse_spec(SPEC)
    msgs = []
    run_sweep(spec, str(tmp_path), time_limit=0, progress=False, say=msgs.append)
    assert fake_train.calls == [] and "time limit of 0 s is reached" in msgs[-2]
    # the last line says the sweep is not done and how to go on, as the parallel path's does
    names = [r.name for r in plan_sweep(spec, str(tmp_path))]
    assert msgs[-1] == f"not started in this invocation: {', '.join(names)} (run the same command again)"
    many = not_started_message([f"r{i}" for i in range(12)])  # a long sweep's: the first 10, then a count
    first = ", ".join(f"r{i}" for i in range(10))
    assert many == f"not started in this invocation: {first} and 2 more (run the same command again)"
    run_sweep(spec, str(tmp_path), only="*-1e10", progress=False, say=lambda s: None)  # measures 768 tokens/s

    records = read_results(str(tmp_path))
    todo = [r for r in plan_sweep(spec, str(tmp_path)) if r.budget_flops == 2e10]
    est = {r.name: estimate_seconds(r, records) for r in todo}
    assert est[todo[0].name] == pytest.approx(todo[0].tokens / 768, rel=0.01)
    clock = [0.0]  # each stand-in run takes the time its measured speed predicts
    monkeypatch.setattr("torchpeer.experiments.runner.time.time", lambda: clock[0])
    real_call = FakeTrainer.__call__

    def timed(self, cfg, *a, **kw):
        clock[0] += est[cfg.name]
        return real_call(self, cfg, *a, **kw)

    monkeypatch.setattr(FakeTrainer, "__call__", timed)
    limit = est[todo[0].name] + est[todo[1].name] / 2
    msgs.clear()
    run_sweep(spec, str(tmp_path), time_limit=limit, progress=False, say=msgs.append)
    assert [c[0] for c in fake_train.calls[4:]] == [todo[0].name]  # the second would end past the limit
    assert f"{todo[1].name}: stopping, its estimated {est[todo[1].name]:.0f} s would pass" in msgs[-2]
    left = ", ".join(r.name for r in todo[1:])
    assert msgs[-1] == f"not started in this invocation: {left} (run the same command again)"
    msgs.clear()
    run_sweep(spec, str(tmp_path), time_limit=min(est.values()) / 2, progress=False, say=msgs.append)
    assert len(fake_train.calls) == 5  # longer than the whole limit: skipped (not stuck), each one said
    assert sum("exceed the whole time limit; run it on its own (--only" in m for m in msgs) == 3


def test_estimate_falls_back_to_the_same_family_and_size(tmp_path):
    """A new seed of a measured model is estimated from that model's tokens/s, not left unknown."""
    spec = parse_spec(SPEC)
    runs = plan_sweep(spec, str(tmp_path))
    run = runs[0]
    twin = {
        "variant": "other-seed",
        "family": run.family,
        "total_params": run.total_params,
        "tokens_per_s": 100.0,
        "wall_seconds": 12.0,
        "train_seconds": 10.0,
    }
    stranger = {**twin, "total_params": run.total_params + 1, "tokens_per_s": 1.0}
    assert estimate_seconds(run, [stranger]) is None
    assert estimate_seconds(run, [stranger, twin]) == pytest.approx(run.tokens / 100.0 + 2.0)


def test_a_new_size_is_estimated_from_its_familys_flop_rate_at_the_nearest_size(tmp_path):
    """A size no run has measured yet is estimated from the training FLOP rate of its family's run
    nearest in FLOPs a token (it used to be unknown, and an unknown run starts whatever the time
    limit: two 3e15 runs were started late and cut that way, campaign.md Batch 23)."""
    spec = parse_spec(SPEC)
    run = plan_sweep(spec, str(tmp_path))[0]
    fpt = run.train_flops_per_token
    near = {"variant": "a", "family": run.family, "total_params": 1, "tokens_per_s": 50.0}
    near.update(train_flops_per_token=2 * fpt, wall_seconds=13.0, train_seconds=10.0)
    far = {**near, "variant": "b", "tokens_per_s": 1.0, "train_flops_per_token": 10 * fpt}
    other = {**near, "variant": "c", "family": run.family + "-other", "train_flops_per_token": fpt}
    seconds, basis = estimate_basis(run, [far, near, other])
    assert basis == "family" and seconds == pytest.approx(run.train_flops / (50.0 * 2 * fpt) + 3.0)
    assert estimate_basis(run, [other]) == (None, None)  # another family's rate says nothing
    assert estimate_basis(run, [other], 100.0) == pytest.approx((run.tokens / 100.0, "assumed"))
    assert estimate_basis(run, [far, near], 100.0)[1] == "family"  # a measured family beats a guess
    twin = {**near, "variant": run.variant, "tokens_per_s": 10.0}
    assert estimate_basis(run, [near, twin]) == pytest.approx((run.tokens / 10.0 + 3.0, "measured"))


def test_a_new_family_is_estimated_from_the_nearest_run_of_its_ffw_kind(tmp_path):
    """A family no run has measured (e.g. a PEER router variant added to lr-check) is estimated from
    the FLOP rate of the run of the same FFW kind nearest in FLOPs a token, marked '~' in the plan; a
    run of another kind says nothing (dense and PEER differ ~2x in rate at one FLOP count)."""
    spec = parse_spec(SPEC)
    run = plan_sweep(spec, str(tmp_path))[0]
    fpt, ffw = run.train_flops_per_token, run.cfg.model.ffw
    kin = {"run": "k-run", "variant": "k", "family": run.family + "-variant", "ffw": ffw, "tokens_per_s": 40.0}
    kin.update(train_flops_per_token=fpt, wall_seconds=11.0, train_seconds=10.0)
    far_kin = {**kin, "variant": "f", "tokens_per_s": 1.0, "train_flops_per_token": 50 * fpt}
    stranger = {**kin, "variant": "s", "ffw": ffw + "-other", "tokens_per_s": 1e6}
    seconds, basis = estimate_basis(run, [stranger, far_kin, kin])
    assert basis == "kind" and seconds == pytest.approx(run.train_flops / (40.0 * fpt) + 1.0)
    assert estimate_basis(run, [stranger]) == (None, None)
    own = {**kin, "variant": "o", "family": run.family, "tokens_per_s": 20.0}  # its own family comes first
    assert estimate_basis(run, [kin, own])[1] == "family"
    plan = format_plan(spec, [run], [kin])
    assert "~" in plan and "unknown" not in plan.split("runs to train")[0].splitlines()[-1]


def test_estimate_of_a_resumed_run_counts_only_its_remaining_steps(tmp_path):
    """A run interrupted at a checkpoint (the end of a GPU job) is estimated by what is left of it,
    so a later job's --time-limit still starts it when its rest fits."""
    spec = parse_spec(SPEC)
    run = plan_sweep(spec, str(tmp_path))[0]
    rec = {"variant": run.variant, "tokens_per_s": 100.0, "wall_seconds": 12.0, "train_seconds": 10.0}
    full = estimate_seconds(run, [rec])
    step = run.steps // 4
    os.makedirs(os.path.join(run.run_dir, "checkpoints", f"step_{step:08d}"))
    assert estimate_seconds(run, [rec]) == pytest.approx(full)  # an incomplete folder (no trainer.pt) counts not
    open(os.path.join(run.run_dir, "checkpoints", f"step_{step:08d}", "trainer.pt"), "wb").close()
    left = run.tokens * (1 - step / run.steps)
    assert estimate_seconds(run, [rec]) == pytest.approx(left / 100.0 + 2.0)
    assert estimate_seconds(run, [rec]) < full


def test_a_field_added_after_the_run_counts_as_its_default(tmp_path, fake_train):
    """Runs recorded before a config field existed stay valid while the spec leaves that field at its
    default; a spec that sets it otherwise is refused, naming the field."""
    spec = parse_spec(SPEC)
    runs_dir = str(tmp_path)
    run_sweep(spec, runs_dir, only="*-1e10", progress=False, say=lambda s: None)
    run = plan_sweep(spec, runs_dir)[0]
    path = os.path.join(run.run_dir, "config.json")
    saved = json.load(open(path))
    del saved["train"]["beta1"]  # as if written by code that had no train.beta1
    json.dump(saved, open(path, "w"))
    msgs = []
    run_sweep(spec, runs_dir, only="*-1e10", progress=False, say=msgs.append)
    assert sum("done, skipped" in m for m in msgs) == 4
    raw = {**SPEC, "base": {**SPEC["base"], "train.beta1": 0.8}}
    with pytest.raises(ValueError, match=r"train.beta1: was None, now 0.8"):
        run_sweep(parse_spec(raw), runs_dir, only="*-1e10", progress=False, say=lambda s: None)


def test_a_changed_config_is_refused_for_interrupted_runs_and_by_the_dry_run(tmp_path, fake_train):
    """A run with checkpoints (interrupted) or a results line, whose spec then changed: the dry run
    names the change instead of planning the run as partial or done, and the sweep refuses it before
    anything trains (not the trainer's resume error, halfway through, with `torchpeer train` advice)."""
    spec = parse_spec(SPEC)
    runs_dir = str(tmp_path)
    run_sweep(spec, runs_dir, only="d_model=16-ffw=dense-1e10", progress=False, say=lambda s: None)
    partial = plan_sweep(spec, runs_dir)[1]  # interrupted at step 2: its config and a checkpoint
    os.makedirs(os.path.join(partial.run_dir, "checkpoints", "step_00000002"))
    open(os.path.join(partial.run_dir, "checkpoints", "step_00000002", "trainer.pt"), "wb").close()
    json.dump(partial.cfg.to_dict(), open(os.path.join(partial.run_dir, "config.json"), "w"))
    changed = parse_spec({**SPEC, "base": {**SPEC["base"], "model.n_layers": 3}})
    for only in ("d_model=16-ffw=dense-1e10", partial.name):
        for dry_run in (True, False):
            with pytest.raises(ValueError, match=rf"run {only} .* another config \(model.n_layers: was 2, now 3\)"):
                run_sweep(changed, runs_dir, only=only, dry_run=dry_run, progress=False, say=lambda s: None)
    with pytest.raises(ValueError) as e:  # a field of [base] changes every run: one error names them all
        run_sweep(changed, runs_dir, only="*-1e10", dry_run=True, say=lambda s: None)
    assert str(e.value).startswith(
        f"2 runs in {runs_dir} were trained with another config (model.n_layers: was 2, now 3): "
        "d_model=16-ffw=dense-1e10, d_model=16-ffw=peer-1e10; give the changed spec a new --runs-dir"
    )
    assert len(fake_train.calls) == 1  # the partial run was not resumed
    out = []
    run_sweep(spec, runs_dir, dry_run=True, say=out.append)  # the spec as it was: both runs as they are
    rows = {line.split()[0]: line for line in out[0].splitlines() if "-ffw=" in line}
    assert rows[partial.name].rstrip().endswith("partial")


def test_recorded_runs_take_the_labels_of_an_edited_spec(tmp_path, fake_train):
    """A spec edited after its runs trained in what the report reads from the results lines (kind,
    the ablation axis, the data rule): the next sweep retrains nothing and rewrites those lines in
    place, saying so, so that the report follows the spec (it used to keep the old kind silently)."""
    runs_dir = str(tmp_path)
    run_sweep(
        parse_spec({**SPEC, "sweep": {**SPEC["sweep"], "max_epochs": 4}}), runs_dir, only="*-1e10", say=lambda s: None
    )
    before = read_results(runs_dir)
    edited = {**SPEC, "sweep": {**SPEC["sweep"], "kind": "ablation", "x": "model.d_model", "series": "model.ffw"}}
    msgs = []
    run_sweep(parse_spec(edited), runs_dir, only="*-1e10", progress=False, say=msgs.append)
    assert len(fake_train.calls) == 4
    assert msgs[0] == (
        "[1/4] d_model=16-ffw=dense-1e10: done, skipped; its results line takes the spec's kind, max_epochs, "
        "series, series_field, x, x_field"
    )
    after = read_results(runs_dir)
    assert [r["run"] for r in after] == [r["run"] for r in before]  # in place, order kept
    assert [(r["kind"], r["x_field"], r["x"], r["series"]) for r in after[:2]] == [
        ("ablation", "model.d_model", 16, "dense"),
        ("ablation", "model.d_model", 16, "peer"),
    ]
    assert all("max_epochs" not in r for r in after)  # the rule was taken out of the spec
    assert [r["valid"] for r in after] == [r["valid"] for r in before]  # what training measured is kept
    msgs.clear()
    run_sweep(parse_spec(edited), runs_dir, only="*-1e10", progress=False, say=msgs.append)
    assert sum(m.endswith("done, skipped") for m in msgs) == 4  # nothing more to relabel
