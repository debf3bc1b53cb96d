"""Resume: exact after SIGKILL and after SIGINT/SIGTERM (which checkpoint on the way out), stale
partial checkpoints removed, what a resume prints, a finished run resumed, resume errors, and
checkpoints written by the code before the re-layout."""

import hashlib
import json
import os
import shutil
import signal
import time

import pytest
import torch

from tests.lm.helpers import cli_subprocess, evals, losses, records, write_config, write_corpus
from torchpeer.cli import main
from torchpeer.lm.checkpoint import list_checkpoints, read_checkpoint_config
from torchpeer.lm.train import train

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "ckpt_v0")


def _wait_until_step(p, run, step, timeout=120):
    """Poll the run's metrics until it logged ``step`` (past a checkpoint); False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if list_checkpoints(run) and os.path.exists(os.path.join(run, "metrics.jsonl")):
            done = losses(run)
            if done and done[-1][0] >= step:
                return True
        time.sleep(0.005)
    return False


def test_sigkill_resume_matches_uninterrupted(tmp_path):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=150)
    ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
    p_ref = cli_subprocess("train", cfg, "--run-dir", ref)

    p = cli_subprocess("train", cfg, "--run-dir", run)
    _wait_until_step(p, run, 13)  # past the step-10 checkpoint, mid-interval
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = losses(run)[-1][0]
    assert killed_at < 150 and not os.path.exists(os.path.join(run, "summary.json"))

    p = cli_subprocess("train", cfg, "--run-dir", run, "--resume")
    assert p.wait() == 0, p.stderr.read().decode()
    assert p_ref.wait() == 0, p_ref.stderr.read().decode()
    assert losses(run) == losses(ref)  # exact floats, every step 1..150
    assert [s for s, _ in losses(run)] == list(range(1, 151))
    assert evals(run) == evals(ref)
    last = [os.path.join(d, "checkpoints", "step_00000150", "model.safetensors") for d in (run, ref)]
    a, b = (hashlib.sha256(open(f, "rb").read()).hexdigest() for f in last)
    assert a == b


def _tree_digest(folder) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_resume_with_other_model_is_one_error_and_keeps_checkpoints(trained, capsys):
    root, cfg, run = trained
    before = _tree_digest(os.path.join(run, "checkpoints"))
    metrics_before = open(os.path.join(run, "metrics.jsonl")).read()
    assert main(["train", cfg, "--run-dir", run, "--resume", "--model.d_model", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "model.d_model: checkpoint 32, now 64" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # it names the command that starts a new run with the change; its config is the run's, changed
    suggested = err.split("start a new run with its config so changed: ")[1].split()
    assert suggested == ["torchpeer", "train", run, "--run-dir", "NEW_FOLDER", "--model.d_model", "64"]
    assert main(["info", run, "--toml", *suggested[5:]]) == 0
    assert "d_model = 64" in capsys.readouterr().out
    # starting over in a folder that has checkpoints, without --resume, is refused too
    assert main(["train", cfg, "--run-dir", run]) == 2
    assert "--resume" in capsys.readouterr().err
    assert _tree_digest(os.path.join(run, "checkpoints")) == before
    assert open(os.path.join(run, "metrics.jsonl")).read() == metrics_before


def test_sigint_and_sigterm_checkpoint_on_the_way_out_and_resume_matches(tmp_path):
    """SIGINT/SIGTERM mid-interval: a checkpoint of the step reached, the resume command, exit 130/143;
    the resumed runs end equal to an uninterrupted one (losses, evals and final weights)."""
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=150)
    ref = str(tmp_path / "ref")
    p_ref = cli_subprocess("train", cfg, "--run-dir", ref, "--train.eval_interval=40")
    runs = {sig: str(tmp_path / sig.name) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs = {s: cli_subprocess("train", cfg, "--run-dir", run, "--train.eval_interval=40") for s, run in runs.items()}
    for sig, p in procs.items():
        assert _wait_until_step(p, runs[sig], 13), "the run finished before the signal"
        p.send_signal(sig)
    resumed = {}
    for sig, p in procs.items():
        run = runs[sig]
        _, err = (s.decode() for s in p.communicate(timeout=60))
        assert p.returncode == 128 + sig, err
        stopped_at = losses(run)[-1][0]
        assert 13 <= stopped_at < 150 and not os.path.exists(os.path.join(run, "summary.json"))
        ckpts = [os.path.basename(c) for c in list_checkpoints(run)]
        assert ckpts[-1] == f"step_{stopped_at:08d}"  # the step it stopped at, not the last interval's
        assert f"interrupted by {sig.name} at step {stopped_at}" in err and "Traceback" not in err
        resume_line = err.strip().splitlines()[-1]
        assert resume_line.startswith("resume with: torchpeer train ") and "--resume" in resume_line
        assert f"--run-dir {run}" in resume_line and "--train.eval_interval=40" in resume_line
        # the printed command, run as printed (minus "resume with: torchpeer")
        resumed[sig] = (cli_subprocess(*resume_line.split()[3:]), stopped_at)
    assert p_ref.wait() == 0, p_ref.stderr.read().decode()
    for sig, (p, stopped_at) in resumed.items():
        out, err = (s.decode() for s in p.communicate(timeout=120))
        assert p.returncode == 0, err
        assert f"from step_{stopped_at:08d}: step {stopped_at}/150, {stopped_at * 8 * 32:,} tokens" in out
        run = runs[sig]
        assert losses(run) == losses(ref) and evals(run) == evals(ref)
        last = [os.path.join(d, "checkpoints", "step_00000150", "model.safetensors") for d in (run, ref)]
        a, b = (hashlib.sha256(open(f, "rb").read()).hexdigest() for f in last)
        assert a == b


def test_signal_without_checkpoints_says_nothing_to_resume(tmp_path):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=5000, extra="checkpoint = false")
    run = str(tmp_path / "run")
    p = cli_subprocess("train", cfg, "--run-dir", run)
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.exists(os.path.join(run, "metrics.jsonl")) and losses(run)):
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = (s.decode() for s in p.communicate(timeout=60))
    assert p.returncode == 143 and "checkpoints are off" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(run, "checkpoints"))


def test_stale_partial_checkpoints_are_removed_on_start_and_resume(tmp_path, capsys):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=12)
    run = tmp_path / "run"
    parts = run / "checkpoints" / ".step_00000007.abc123.tmp"
    parts.mkdir(parents=True)
    (parts / "model.safetensors").write_bytes(os.urandom(1000))
    assert main(["train", cfg, "--run-dir", str(run), "--train.max_steps", "10"]) == 0
    assert "removed 1 partial checkpoint" in capsys.readouterr().out
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000010"]
    # a kill mid-save of a re-saved step leaves step_N.old (the complete old copy) and a temporary:
    # the temporary goes, the old copy comes back as step_N
    ckpt = run / "checkpoints" / "step_00000010"
    os.replace(ckpt, str(ckpt) + ".old")
    (run / "checkpoints" / ".step_00000010.xyz.tmp").mkdir()
    # the run was saved with max_steps 10: going on to the TOML's 12 takes an override on resume
    assert main(["train", cfg, "--run-dir", str(run), "--resume", "--train.max_steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "from step_00000010: step 10/12, 2,560 tokens" in out
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000010", "step_00000012"]
    assert [s for s, _ in losses(run)] == list(range(1, 13))


def test_resuming_a_finished_run_redoes_nothing_and_names_how_to_train_on(trained, tmp_path, capsys, monkeypatch):
    """A resume of a run whose final evaluation is recorded builds no model and evaluates nothing (before:
    it evaluated the whole valid split again and rewrote the records), leaves the run folder as it was,
    and prints one line whose command trains the run further."""
    from torchpeer.lm.config_io import load_config
    from torchpeer.lm.trainer import Trainer

    root, cfg, run = trained
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    before = _tree_digest(copy)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was built or evaluated again")

    monkeypatch.setattr(Trainer, "evaluate", refuse)
    monkeypatch.setattr(Trainer, "_build_model", refuse)
    assert main(["train", cfg, "--run-dir", copy, "--resume"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "had already finished" in line]
    assert lines == [
        f"{copy} had already finished at step 60/60 (train.max_steps = 60) and its final evaluation is recorded "
        "in summary.json: nothing was trained or evaluated again; to train further, raise train.max_steps, "
        f"e.g. torchpeer train {copy} --resume --train.max_steps 120"
    ]
    assert "validation perplexity (v)" in out  # the recorded results, as the run ended
    assert _tree_digest(copy) == before

    # an eval set added on resume is not recorded yet: that resume evaluates (nothing is skipped)
    added = load_config(cfg, ["--data.valid.w", os.path.join(root, "valid.txt")])
    assert Trainer(added, copy, resume=True, progress=False).recorded_finish() is None
    # a budget in FLOPs that ends at the same step: finished too (FLOPs per token from summary.json)
    flops = json.load(open(os.path.join(copy, "summary.json")))["train_flops"]
    by_flops = Trainer(load_config(cfg, ["--train.max_steps", "none", "--train.max_flops", str(flops)]), copy, True)
    assert by_flops.recorded_finish() is not None and by_flops.budget_setting.startswith("train.max_flops")

    monkeypatch.undo()
    assert main(lines[0].split("e.g. torchpeer ")[1].split()) == 0  # the printed command, as printed
    assert [s for s, _ in losses(copy)] == list(range(1, 121)) and losses(copy)[:60] == losses(run)
    assert [r["step"] for r in records(copy) if r.get("final")] == [120]


def test_a_new_run_on_a_finished_run_names_the_budget_to_raise(trained, tmp_path, capsys):
    """Training again (no --resume) on a finished run's folder said "pass --resume to continue that run",
    and --resume then only said it had finished: the error says it finished, and what to raise with
    --resume; an unfinished run (the config's budget ends later) keeps "pass --resume"."""
    root, cfg, run = trained
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    before = _tree_digest(copy)
    finished = (
        f"error: {copy} holds a run that has finished (at step 60, train.max_steps = 60): --resume alone has "
        "nothing to do; to train it further, raise train.max_steps (or train.max_tokens / train.max_flops) with "
        f"--resume, e.g. torchpeer train {copy} --resume --train.max_steps 120; to start a new run, choose "
        "another --run-dir\n"
    )
    assert main(["train", cfg, "--run-dir", copy, "--no-progress"]) == 2
    assert capsys.readouterr().err == finished
    assert main(["train", copy, "--no-progress"]) == 2  # the run folder as the config: test_cli.py
    assert "run has finished (at step 60, train.max_steps = 60)" in capsys.readouterr().err
    assert main(["train", cfg, "--run-dir", copy, "--train.max_steps", "100"]) == 2  # not finished at 100
    err = capsys.readouterr().err
    assert err == (
        f"error: {copy} already holds checkpoints (latest: step_00000060); pass --resume to continue that run, "
        "or choose another --run-dir\n"
    )
    assert _tree_digest(copy) == before


def test_resume_from_a_checkpoint_written_by_the_old_code(tmp_path):
    """A checkpoint of the pre-relayout trainer (commit 9253f8b) resumes: weights, optimizer moments,
    sampler and RNG states give the losses the old code logged for the next steps, bit for bit."""
    run = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURE, "step_00000003"), run / "checkpoints" / "step_00000003")
    expected = json.load(open(os.path.join(FIXTURE, "expected_resume.json")))
    cfg = read_checkpoint_config(str(run / "checkpoints" / "step_00000003"))
    train_txt, valid_txt = write_corpus(tmp_path, 300, 20)  # the corpus the old code resumed the fixture on
    cfg.train.max_steps = 5
    cfg.data.train, cfg.data.valid, cfg.data.cache_dir = train_txt, {"v": valid_txt}, str(tmp_path / "cache")
    # The old code's numbers were recorded with one intra-op thread; with two, CPU reductions sum in
    # another order (the validation loss then differs by ~5e-9), so pin the thread count as recorded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(cfg, str(run), resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [[s, v] for s, v in losses(run)] == expected["losses"]
    assert summary["valid"]["v"]["loss"] == pytest.approx(expected["final_valid_loss"], rel=1e-12)


def test_a_signal_while_the_run_is_built_stops_at_once(tmp_path, capsys, monkeypatch):
    """SIGTERM during the build (tokenizer training, tokenising: minutes on a big corpus) does not
    wait for the first step: exit 143 at once, with nothing to resume from."""
    from torchpeer.lm.trainer import Trainer

    def signalled(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises in here
        raise AssertionError("the signal did not stop the build")

    monkeypatch.setattr(Trainer, "_build_data", signalled)
    write_corpus(tmp_path)
    cfg = write_config(tmp_path)
    t0 = time.time()
    assert main(["train", cfg, "--run-dir", str(tmp_path / "run")]) == 143
    assert time.time() - t0 < 20
    err = capsys.readouterr().err
    assert err == "interrupted by SIGTERM at step 0, before the first step: nothing to resume from\n"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back


def test_a_signal_during_the_final_evaluation_stops_at_once_and_resume_evaluates(tmp_path, capsys, monkeypatch):
    """SIGINT while the final full evaluation runs (minutes on a large valid set) stops it at once,
    exit 130, no summary.json; the final checkpoint is there, and the resume command evaluates and
    finishes the run (before: the first Ctrl-C was ignored until the evaluation ended, exit 0)."""
    from torchpeer.lm.trainer import Trainer

    evaluate = Trainer.evaluate

    def signalled(self, batches, progress=False):
        if batches is None:  # the final, full evaluation
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # the handler raises in here
            raise AssertionError("the signal did not stop the final evaluation")
        return evaluate(self, batches, progress)

    write_corpus(tmp_path)
    cfg = write_config(tmp_path)
    run = str(tmp_path / "run")
    monkeypatch.setattr(Trainer, "evaluate", signalled)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when run as a background job
    t0 = time.time()
    assert main(["train", cfg, "--run-dir", run]) == 130
    assert time.time() - t0 < 25 and not os.path.exists(os.path.join(run, "summary.json"))
    err = capsys.readouterr().err
    assert "interrupted by SIGINT" in err and "--resume" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert main(["train", cfg, "--run-dir", run, "--resume"]) == 0
    with open(os.path.join(run, "summary.json")) as fh:
        assert json.load(fh)["valid"]
