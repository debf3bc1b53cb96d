"""torchpeer's core never imports torchpeer.experiments (only the command line does, lazily)."""

import os
import re
import subprocess
import sys

import torchpeer

PKG = os.path.dirname(os.path.abspath(torchpeer.__file__))
IMPORT_RE = re.compile(
    r"^\s*(from\s+torchpeer\.experiments\b|import\s+torchpeer\.experiments\b|from\s+torchpeer\s+import\s+[^#\n]*\bexperiments\b)",
    re.M,
)


def core_modules():
    for root, dirs, files in os.walk(PKG):
        rel = os.path.relpath(root, PKG)
        top = rel.split(os.sep)[0]
        if top in ("experiments", "cli"):
            continue
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py") and not (rel == "." and f == "cli.py"):
                yield os.path.join(root, f)


def test_no_core_module_imports_experiments():
    files = list(core_modules())
    assert len(files) > 10 and any(f.endswith(os.path.join("lm", "train.py")) for f in files)
    offenders = [os.path.relpath(f, PKG) for f in files if IMPORT_RE.search(open(f, encoding="utf-8").read())]
    assert offenders == []
    assert IMPORT_RE.search("    from torchpeer.experiments.fit import fit_isoflop\n")  # the check can fail


def test_importing_the_core_leaves_experiments_unloaded():
    code = (
        "import sys, torchpeer, torchpeer.lm, torchpeer.data\n"
        "bad = sorted(m for m in sys.modules if m.startswith('torchpeer.experiments'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(PKG) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
