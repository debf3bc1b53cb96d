"""Experiments: sweep specs, planning, resumable runs, isoFLOP fits, report tables and figures.

    from torchpeer.experiments import load_spec, plan_sweep, run_sweep, write_report

    spec = load_spec("cpu-smoke")                 # shipped name or a TOML path
    run_sweep(spec, "runs/cpu-smoke")             # trains what is missing, appends results.jsonl
    write_report("runs/cpu-smoke")                # report/report.md + PNGs

Command line: ``torchpeer sweep SPEC`` and ``torchpeer report RUNS_DIR`` (also
``python -m torchpeer.experiments ...``). Nothing in torchpeer's core imports this package.
See docs/experiments.md.
"""

from torchpeer.experiments.fit import IsoFLOPFit, fit_isoflop, isoflop_fits
from torchpeer.experiments.plan import PlannedRun, budget_label, plan_sweep, select_runs
from torchpeer.experiments.report import write_report
from torchpeer.experiments.results import append_result, read_results
from torchpeer.experiments.runner import format_plan, run_sweep
from torchpeer.experiments.spec import SweepSpec, Variant, list_specs, load_spec, parse_spec

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
