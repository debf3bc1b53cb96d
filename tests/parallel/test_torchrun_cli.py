"""The command line a user types: torchrun with 2 CPU processes, then eval/generate of the
sharded (DCP) checkpoint in one plain process."""

import json
import os
import subprocess
import sys

from tests.parallel.train_workers import write_tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_torchrun_two_cpu_processes_then_eval_and_generate_in_one(tmp_path):
    cfg = write_tiny(str(tmp_path))
    run = str(tmp_path / "run")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, "-m", "torchpeer.cli", "train", cfg, "--run-dir", run, "--train.max_steps", "2"], tmp_path)
    with open(os.path.join(run, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["world_size"] == 2 and summary["steps"] == 2
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        start = json.loads(fh.readline())
    assert start["event"] == "start" and start["world_size"] == 2
    ckpt = os.path.join(run, "checkpoints", "step_00000002")
    assert os.path.isdir(os.path.join(ckpt, "dcp")) and not os.path.exists(os.path.join(ckpt, "model.safetensors"))

    out_json = str(tmp_path / "eval.json")
    _run(["-m", "torchpeer.cli", "eval", run, "--out", out_json, "--device", "cpu"], tmp_path)
    with open(out_json) as fh:
        evaluated = json.load(fh)
    got = evaluated.get("results", evaluated)["v"]
    assert abs(got["loss"] - summary["valid"]["v"]["loss"]) <= 1e-6 * abs(summary["valid"]["v"]["loss"])
    text = _run(["-m", "torchpeer.cli", "generate", run, "--prompt", "the cat", "--max-new-tokens", "8"], tmp_path)
    assert text.strip()
