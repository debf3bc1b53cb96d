"""``torchpeer report RUNS_DIR [--out DIR]`` (argparse side only; the work is imported when it runs)."""

from __future__ import annotations

EPILOG = """\
examples:
  torchpeer report runs/cpu-smoke                      # runs/cpu-smoke/report/report.md, PNGs, rows.csv
  torchpeer report runs/isoflop --out experiments/results/DATE-isoflop --with-runs   # a folder to commit
  torchpeer report experiments/results/2026-12-04-isoflop --out /tmp/again     # a committed folder again
  torchpeer report runs/isoflop-lrw --against experiments/results/2026-12-04-isoflop   # the same runs, lr changed
"""


def add_parser(subparsers):
    import argparse

    p = subparsers.add_parser(
        "report",
        help="markdown tables and PNG figures of a sweep's results.jsonl",
        description="Write RUNS_DIR/report/report.md (runs, isoFLOP fits, per-eval-set perplexities,\n"
        "ablations), its PNG figures (isoFLOP curves, ablations, training curves) and rows.csv\n"
        "(every run on every eval set, a row each: loss, ppl, usage, KL, FLOPs, tokens/s).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs_dir", help="a sweep's runs folder (holds results.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default: RUNS_DIR/report)")
    p.add_argument(
        "--params",
        choices=("active", "total"),
        default="active",
        help="x-axis of the isoFLOP fits: active parameters (default) or all parameters",
    )
    p.add_argument(
        "--max-epochs",
        type=_max_epochs,
        default="recorded",
        metavar="N|none",
        help="the data rule: runs with more epochs (passes over the train split) are marked, left out of the "
        "isoFLOP fits and drawn hollow; default: the max_epochs each sweep's results lines recorded from its "
        "spec (none in lines from before the field); 'none': no rule",
    )
    p.add_argument(
        "--with-runs",
        action="store_true",
        help="also copy results.jsonl and each run's config.json, summary.json and metrics.jsonl (compressed, as "
        "metrics.jsonl.xz) into --out, so that the folder is a self-contained record (commit it; 'torchpeer "
        "report' and 'torchpeer plot' work on it again)",
    )
    p.add_argument(
        "--against",
        metavar="OTHER_RUNS_DIR",
        default=None,
        help="another sweep's runs folder: its runs of the same names (twins: e.g. isoflop-lrw's runs in isoflop) "
        "are set beside these, with the loss differences, each family's best run per budget in both and the "
        "order of the families in each",
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import os

    from torchpeer.experiments.report import write_report
    from torchpeer.experiments.results import copy_results

    if args.out and (args.out.lower().endswith((".md", ".png", ".csv", ".json", ".jsonl")) or os.path.isfile(args.out)):
        raise ValueError(
            f"--out {args.out} names a file; --out is the folder the report writes report.md, the figures and "
            f"rows.csv into: give a folder, e.g. --out {os.path.splitext(args.out)[0] or 'report'}"
        )
    if args.with_runs:
        if not args.out:
            raise ValueError("--with-runs needs --out DIR (the folder to copy the results into)")
        n = copy_results(args.runs_dir, args.out)
        print(f"copied results.jsonl and {n} runs' records into {args.out}")
    written = write_report(
        args.runs_dir, args.out, params_key=f"{args.params}_params", max_epochs=args.max_epochs, against=args.against
    )
    for what, path in written.items():
        print(f"{what}: {path}")
    return 0


def _max_epochs(text: str):
    """--max-epochs: a positive number, 'none' (no rule) or 'recorded' (the results lines' own)."""
    import argparse
    import math

    if text.lower() in ("none", "recorded"):
        return None if text.lower() == "none" else "recorded"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rule: give the most passes over the train split a run in the fit may make, "
            "e.g. --max-epochs 4, or 'none' for no rule"
        )
    return value
