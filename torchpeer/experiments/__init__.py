"""Experiments: sweep specs, planning, resumable runs, isoFLOP fits, report tables and figures.

    from torchpeer.experiments import load_spec, plan_sweep, run_sweep, write_report

    spec = load_spec("cpu-smoke")                 # shipped name or a TOML path
    run_sweep(spec, "runs/cpu-smoke")             # trains what is missing, appends results.jsonl
    write_report("runs/cpu-smoke")                # report/report.md + PNGs

Command line: ``torchpeer sweep SPEC`` and ``torchpeer report RUNS_DIR`` (also
``python -m torchpeer.experiments ...``). Nothing in torchpeer's core imports this package.
See docs/experiments.md.
"""

from __future__ import annotations

import importlib

# Public name -> defining module. Loaded on first use, so that ``torchpeer --help`` (which imports
# the light sweep_command / report_command modules of this package) does not load numpy or torch.
_EXPORTS = {
    "IsoFLOPFit": "fit",
    "fit_isoflop": "fit",
    "isoflop_fits": "fit",
    "PlannedRun": "plan",
    "budget_label": "plan",
    "plan_sweep": "plan",
    "select_runs": "plan",
    "write_report": "report",
    "append_result": "results",
    "read_results": "results",
    "format_plan": "runner",
    "run_sweep": "runner",
    "SweepSpec": "spec",
    "Variant": "spec",
    "list_specs": "spec",
    "load_spec": "spec",
    "parse_spec": "spec",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torchpeer.experiments' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"torchpeer.experiments.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "IsoFLOPFit",
    "PlannedRun",
    "SweepSpec",
    "Variant",
    "append_result",
    "budget_label",
    "fit_isoflop",
    "format_plan",
    "isoflop_fits",
    "list_specs",
    "load_spec",
    "parse_spec",
    "plan_sweep",
    "read_results",
    "run_sweep",
    "select_runs",
    "write_report",
]
