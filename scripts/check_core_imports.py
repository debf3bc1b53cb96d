"""Check that the core of torchpeer imports and runs without the optional packages.

    python scripts/check_core_imports.py                  # hide the extras' packages, then check
    python scripts/check_core_imports.py --block numpy    # control: a core dependency hidden -> fails

The extras (pyproject.toml: gpu, viz, hf, test) install triton, matplotlib, tensorboard and
transformers; the main install does not, so nothing outside the optional modules below may import
them at import time. The packages are hidden the way "not installed" looks to Python: the path
finder does not find them (``import x`` raises ModuleNotFoundError, ``importlib.util.find_spec(x)``
is None). Then every torchpeer module is imported, the CLI parser is built (it imports every
subcommand module) and a small PEER layer runs forward and backward on the CPU.
Exit status 0 when all of that works, 1 otherwise (each failure on one line).
CI runs it in a virtual environment without the extras; tests/test_core_imports.py runs it with the
packages hidden.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import pkgutil
import sys
import traceback

EXTRAS = ("triton", "matplotlib", "tensorboard", "transformers", "accelerate")

# Modules that exist only for an extra and may import it at the top:
#   Triton kernels (torchpeer/ops/*/triton_*.py, dispatched to only when triton imports), and the
#   transformers remote-code files of an exported model (torchpeer/hf/{modeling,configuration}_*.py).
OPTIONAL = (".triton_", "torchpeer.hf.modeling_", "torchpeer.hf.configuration_")


def hide(packages: set[str]) -> None:
    """Make ``packages`` (top-level names) look not installed to this interpreter."""

    class HidingPathFinder(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] in packages:
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [HidingPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    for name in list(sys.modules):
        if name.partition(".")[0] in packages:
            del sys.modules[name]


def is_optional(module: str) -> bool:
    return any(p in module if p.startswith(".") else module.startswith(p) for p in OPTIONAL)


def check() -> list[str]:
    """Import every non-optional torchpeer module, build the CLI, run a PEER layer; the failures."""
    failures = []
    try:
        import torchpeer
    except Exception as e:
        return [f"import torchpeer: {type(e).__name__}: {e}"]
    names = sorted(m.name for m in pkgutil.walk_packages(torchpeer.__path__, "torchpeer."))
    for name in names:
        if name.rsplit(".", 1)[-1] == "__main__" or is_optional(name):
            continue  # __main__ modules run their command when imported
        try:
            importlib.import_module(name)
        except Exception as e:
            failures.append(f"import {name}: {type(e).__name__}: {e}")
    try:
        from torchpeer.cli import build_parser

        build_parser()
    except Exception as e:
        failures.append(f"torchpeer CLI parser: {type(e).__name__}: {e}")
    try:
        import torch

        from torchpeer import PEER

        layer = PEER(d_model=16, n_experts=64, heads=2, top_k=4, d_key=8)
        x = torch.randn(3, 5, 16, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    except Exception as e:
        failures.append(f"PEER forward/backward on the CPU: {type(e).__name__}: {e}")
        traceback.print_exc()
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--block", default=",".join(EXTRAS), help=f"comma-separated packages to hide (default {','.join(EXTRAS)})"
    )
    args = ap.parse_args(argv)
    blocked = {p.strip() for p in args.block.split(",") if p.strip()}
    hide(blocked)
    failures = check()
    for f in failures:
        print(f"FAIL {f}")
    if not failures:
        print(f"ok: torchpeer imports and runs with {', '.join(sorted(blocked)) or 'nothing'} hidden")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
