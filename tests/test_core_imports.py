"""The core install works without the extras: every non-optional torchpeer module imports, the CLI
parser builds and a PEER layer trains with triton, matplotlib, tensorboard and transformers hidden
(scripts/check_core_imports.py; CI also runs it in a virtual environment without the extras)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "check_core_imports.py")


def run_check(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO, env=env)


def test_core_imports_without_the_extras():
    proc = run_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok: torchpeer imports and runs with" in proc.stdout and "triton" in proc.stdout


def test_hidden_package_looks_not_installed_and_a_core_dependency_is_caught():
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {os.path.dirname(SCRIPT)!r})\n"
        "import check_core_imports as c\n"
        "c.hide({'matplotlib'})\n"
        "assert importlib.util.find_spec('matplotlib') is None\n"
        "try:\n"
        "    import matplotlib.pyplot\n"
        "except ModuleNotFoundError as e:\n"
        "    print('hidden', e.name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "hidden matplotlib", proc.stderr
    # control: hiding a real core dependency makes the check fail and name the modules
    proc = run_check("--block", "numpy")
    assert proc.returncode == 1
    assert "FAIL import torchpeer.lm.train: ModuleNotFoundError: No module named 'numpy'" in proc.stdout
