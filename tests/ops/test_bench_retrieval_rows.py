"""benchmarks/bench_retrieval.py --rows runs only the rows it names (the next lease's short decision
commands: e.g. the queue forward's check rows alone) and refuses an empty selection."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_retrieval.py")


# the script under the test session's interpreter (tests/triton_interpreter.py): its check rows compare
# forwards of different tile shapes bit for bit, which OpenBLAS's matmul does not promise across hosts
LAUNCH = (
    "import runpy, sys, tests.triton_interpreter as t; t.setup(); "
    "sys.argv[0] = {!r}; runpy.run_path({!r}, run_name='__main__')"
)


def _run(tmp_path, *args):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-c", LAUNCH.format(SCRIPT, SCRIPT), "--smoke", "--only", "onepass", "--quick",
         "--out", str(tmp_path), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_rows_runs_only_the_named_rows_and_they_hold(tmp_path):
    proc = _run(tmp_path, "--rows", "check queue fp32,check vs threshold")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_retrieval.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names == ["check vs threshold", "check queue fp32", "total"]
    for r in rows[:2]:  # bit-equal to the reference forwards at the smoke size (the interpreter)
        assert r["bit_equal"] is True and r["idx_equal_frac"] == 1.0, r


def test_rows_without_a_substring_is_refused(tmp_path):
    proc = _run(tmp_path, "--rows", " , ")
    assert proc.returncode == 2 and "--rows needs at least one substring" in proc.stderr
