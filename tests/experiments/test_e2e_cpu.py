"""The whole path on the CPU with the shipped cpu-smoke spec (PTB): sweep in a subprocess, SIGKILL it
in the middle of its second run, sweep again (finished run skipped, killed run resumed from its
checkpoint, every run in results.jsonl once), then the report and its PNGs."""

import json
import os
import signal
import subprocess
import sys
import time

import torchpeer
from tests.experiments.test_report import assert_real_plot
from torchpeer.experiments import load_spec, plan_sweep, read_results


def env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(torchpeer.__file__)))
    return {
        **os.environ,
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }


def command(*args):
    return [sys.executable, "-m", "torchpeer.experiments", *args]


def test_cpu_smoke_sweep_kill_resume_report(tmp_path, monkeypatch, capsys):
    runs_dir = tmp_path / "runs"
    plan = plan_sweep(load_spec("cpu-smoke"), str(runs_dir))
    names = [r.name for r in plan]
    assert len(names) == 6
    victim = plan[1]
    ckpts = os.path.join(victim.run_dir, "checkpoints")
    sweep = command("sweep", "cpu-smoke", "--runs-dir", str(runs_dir), "--no-progress")

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(sweep, cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        try:
            while not (os.path.isdir(ckpts) and any(f.startswith("step_") for f in os.listdir(ckpts))):
                assert proc.poll() is None, (
                    "the sweep ended before it was killed:\n" + open(tmp_path / "first.log").read()
                )
                assert time.time() < deadline, "no checkpoint of the second run in time"
                time.sleep(0.02)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [r["run"] for r in read_results(str(runs_dir))] == names[:1]
    assert not os.path.exists(os.path.join(victim.run_dir, "summary.json"))

    second = subprocess.run(sweep, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    out = second.stdout
    assert f"[1/6] {names[0]}: done, skipped" in out
    assert f"[2/6] {victim.name}: resuming from step_" in out
    assert all(f"{n}: starting" in out for n in names[2:])

    recs = read_results(str(runs_dir))
    assert [r["run"] for r in recs] == names  # each run once, in plan order
    for r, p in zip(recs, plan):
        assert set(r["valid"]) == {"ptb"}  # the final evaluation (several sets: tests/experiments/test_report.py)
        assert r["tokens"] == p.tokens and r["train_flops"] <= 7.5e9 and r["tokens_per_s"] > 0
        assert r["memory"]["estimate"] > 0 and r["memory"]["peak"] is None  # no GPU peak on the CPU
        assert (r["family"] == "peer") == bool(r["valid"]["ptb"]["usage"])
        assert 0 < r["valid"]["ptb"]["loss"] < 5.6  # below uniform over 257 bytes (ln 257 = 5.55)
    # the resumed run's log reads as one run: each logged step once, up to the last
    with open(os.path.join(victim.run_dir, "metrics.jsonl")) as fh:
        steps = [rec["step"] for rec in map(json.loads, fh) if "loss" in rec]
    assert steps == sorted(set(steps)) and steps[-1] == victim.steps

    rep = subprocess.run(command("report", str(runs_dir)), cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    report_dir = runs_dir / "report"
    md = (report_dir / "report.md").read_text()
    assert "### isoFLOP fits" in md and "| ptb |" in md
    assert all(n in md for n in names)
    assert_real_plot(report_dir / "isoflop-cpu-smoke.png", colours=("#1f77b4", "#d62728"))
    assert_real_plot(report_dir / "curves-cpu-smoke.png")

    # a third sweep skips every run; in-process (the two above ran the command line's process)
    from torchpeer.experiments.__main__ import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(sweep[3:]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 6 and len(read_results(str(runs_dir))) == 6
