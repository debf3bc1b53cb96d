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

from torchpeer.lazy import lazy_exports

# Public name -> defining module, loaded on first use (torchpeer/lazy.py), so that ``torchpeer --help``
# (which imports the light sweep_command / report_command modules of this package) loads no numpy or torch.
_EXPORTS = {
    "IsoFLOPFit": "torchpeer.experiments.fit",
    "fit_isoflop": "torchpeer.experiments.fit",
    "isoflop_fits": "torchpeer.experiments.fit",
    "PlannedRun": "torchpeer.experiments.plan",
    "budget_label": "torchpeer.experiments.plan",
    "plan_sweep": "torchpeer.experiments.plan",
    "select_runs": "torchpeer.experiments.plan",
    "write_report": "torchpeer.experiments.report",
    "append_result": "torchpeer.experiments.results",
    "read_results": "torchpeer.experiments.results",
    "format_plan": "torchpeer.experiments.runner",
    "run_sweep": "torchpeer.experiments.runner",
    "SweepSpec": "torchpeer.experiments.spec",
    "Variant": "torchpeer.experiments.spec",
    "list_specs": "torchpeer.experiments.spec",
    "load_spec": "torchpeer.experiments.spec",
    "parse_spec": "torchpeer.experiments.spec",
}


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

lazy_exports(__name__)
