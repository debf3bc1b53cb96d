"""What `torchpeer train --resume` continues with: the run's saved config (not the named TOML file's),
overrides on top (printed, and the run folder keeps every config it was trained under), and one
error line for a budget the checkpoint is already past or a folder with nothing to resume."""

import json
import os
import shutil

import pytest

from tests.lm.helpers import evals, losses, write_config, write_corpus
from torchpeer.cli import main


def _interrupt_at_10(run: str) -> None:
    """As if the run had been killed between steps 10 and 20: only the step-10 checkpoint is left."""
    shutil.rmtree(os.path.join(run, "checkpoints", "step_00000020"))
    os.remove(os.path.join(run, "summary.json"))


def _json(path):
    with open(path) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-config")
    write_corpus(root)
    return root, write_config(root, max_steps=60)  # the TOML file says 60 steps


def test_resume_continues_the_saved_run_not_the_toml_file(corpus, tmp_path, capsys):
    """Started with --train.max_steps 20 on a 60-step TOML: the resume stops at 20, like the run would
    have, and says that the file differs instead of silently training on to 60."""
    _, cfg = corpus
    run = str(tmp_path / "run")
    assert main(["train", cfg, "--run-dir", run, "--train.max_steps", "20", "--no-progress"]) == 0
    uninterrupted, config_before = losses(run), _json(os.path.join(run, "config.json"))
    _interrupt_at_10(run)
    capsys.readouterr()
    assert main(["train", cfg, "--run-dir", run, "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"note: the run continues under its saved config; {cfg} differs in train.max_steps (run 20, file 60)" in out
    assert "e.g. --train.max_steps 60" in out and "from step_00000010: step 10/20" in out
    assert "changed on resume" not in out
    trained_line = next(line for line in out.splitlines() if line.startswith("trained "))
    assert trained_line.startswith("trained 20 steps (") and trained_line.endswith(
        "(the whole run; steps 11-20 in this session)"
    )
    assert losses(run) == uninterrupted and [s for s, _ in losses(run)] == list(range(1, 21))
    assert _json(os.path.join(run, "config.json")) == config_before
    assert os.listdir(os.path.join(run, "configs")) == ["from_step_00000000.json"]


def test_overrides_on_resume_are_applied_listed_and_kept(corpus, tmp_path, capsys):
    """A 20-step run (constant lr after warmup) resumed at step 10 with --train.max_steps 40 logs exactly
    what an uninterrupted 40-step run with the same settings logs; both configs stay in the run folder."""
    _, cfg = corpus
    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    constant = ["--train.schedule", "constant", "--no-progress"]
    assert main(["train", cfg, "--run-dir", ref, "--train.max_steps", "40", *constant]) == 0
    assert main(["train", cfg, "--run-dir", run, "--train.max_steps", "20", *constant]) == 0
    _interrupt_at_10(run)
    capsys.readouterr()
    assert main(["train", cfg, "--run-dir", run, "--resume", "--train.max_steps", "40", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"changed on resume (kept in {run}/configs/): train.max_steps: 20 -> 40" in out
    assert "from step_00000010: step 10/40" in out
    assert "differs in train.schedule (run 'constant', file 'cosine'); to change a field" in out  # not max_steps
    assert losses(run) == losses(ref) and evals(run) == evals(ref)
    history = sorted(os.listdir(os.path.join(run, "configs")))
    assert history == ["from_step_00000000.json", "from_step_00000010.json"]
    first, second = (_json(os.path.join(run, "configs", h)) for h in history)
    assert (first["train"]["max_steps"], second["train"]["max_steps"]) == (20, 40)
    assert _json(os.path.join(run, "config.json")) == second


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.max_steps", "50"], "(train.max_steps = 50); to train on, raise --train.max_steps past step 60"),
        (
            ["--train.max_steps", "none", "--train.max_tokens", "2560"],
            "(train.max_tokens = 2560 at 256 tokens per step); to train on, raise --train.max_tokens past step 60",
        ),
    ],
)
def test_a_budget_the_checkpoint_is_past_names_the_flag(trained, tmp_path, capsys, overrides, message):
    _, cfg, ref = trained
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    before = {f: os.path.getmtime(os.path.join(run, f)) for f in ("config.json", "metrics.jsonl", "summary.json")}
    assert main(["train", cfg, "--run-dir", run, "--resume", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the checkpoint is at step 60, beyond this config's ") and message in err
    assert err.count("\n") == 1 and f"torchpeer eval {run}" in err
    assert {f: os.path.getmtime(os.path.join(run, f)) for f in before} == before
    assert not os.path.exists(os.path.join(run, "configs", "from_step_00000060.json"))


@pytest.mark.parametrize("case", ["missing", "empty", "started", "sweep"])
def test_resume_with_nothing_to_resume_is_one_error(trained, tmp_path, capsys, case):
    """--resume on a mistyped, empty or never-checkpointed folder says there is nothing to resume
    (instead of training a new run there); on a folder of runs it lists them. Nothing is written."""
    _, cfg, ref = trained
    run = tmp_path / "runs" / "typo"
    if case in ("empty", "started"):
        run.mkdir(parents=True)
    if case == "started":
        (run / "metrics.jsonl").write_text('{"step": 0, "event": "start"}\n')
    if case == "sweep":
        for name in ("a", "b"):
            shutil.copytree(ref, run / "runs" / name)
    before = sorted(p for p, _, _ in os.walk(tmp_path))
    assert main(["train", cfg, "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    expected = {
        "missing": f"error: nothing to resume: {run} does not exist; check --run-dir",
        "empty": f"error: nothing to resume in {run}: it holds no checkpoint; check --run-dir",
        "started": f"error: nothing to resume in {run}: it holds no checkpoint (the run stopped before its first",
        "sweep": f"error: {run} is a folder of 2 runs, not one run: resume one of {run}/runs/a, {run}/runs/b",
    }[case]
    assert err.startswith(expected)
    assert sorted(p for p, _, _ in os.walk(tmp_path)) == before
    if case == "sweep":  # eval on a sweep folder lists its runs the same way
        assert main(["eval", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: '{run}' is a folder of 2 runs, not one run: give one of {run}/runs/a, ")
    if case == "started":  # eval / generate say it is a run without checkpoints (before: 'neither a
        (run / "summary.json").write_text("{}")  # checkpoint folder nor a run folder with checkpoints')
        for cmd in ("eval", "generate"):
            assert main([cmd, str(run)]) == 2
            assert capsys.readouterr().err == (
                f"error: '{run}' is a run folder without checkpoints (trained with train.checkpoint = false, or "
                "stopped before its first checkpoint); its final evaluation is in its summary.json\n"
            )


def test_eval_on_a_sweep_folder_without_checkpoints_points_to_its_results(tmp_path, capsys):
    """A GPU sweep's runs keep no checkpoints: eval on its folder says where the results are instead."""
    from torchpeer.cli import main

    sweep = tmp_path / "sweep"
    (sweep / "run-a").mkdir(parents=True)
    (sweep / "run-a" / "summary.json").write_text("{}")
    (sweep / "results.jsonl").write_text('{"run": "run-a"}\n')
    assert main(["eval", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kept no checkpoints" in err and f"torchpeer report {sweep}" in err
