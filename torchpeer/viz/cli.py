"""``torchpeer plot RUN_DIR [RUN_DIR ...] [--out FILE.png] [--x step|tokens|time]``."""

from __future__ import annotations

import os
import sys

EPILOG = """\
examples:
  torchpeer plot runs/ptb-tiny                       # writes runs/ptb-tiny/metrics.png
  torchpeer plot runs/peer runs/dense --out cmp.png --x tokens
"""


def add_parser(subparsers):
    from torchpeer.cli.common import HelpFormatter

    p = subparsers.add_parser(
        "plot",
        help="training curves of one or several runs as a PNG",
        description="Loss and perplexity (training and every eval set), bits per byte, learning rate, "
        "tokens/s, gradient norm, expert usage and KL over training, read from RUN_DIR/metrics.jsonl (or a "
        "committed run's metrics.jsonl.xz), as one PNG. Needs matplotlib (pip install matplotlib, or the [viz] extra).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,  # prose wrapped to the terminal, examples as written
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) written by torchpeer train")
    p.add_argument(
        "--out",
        help="output file (.png, or .svg / .pdf); default RUN_DIR/metrics.png for one run, runs.png for several",
    )
    p.add_argument("--x", default="step", choices=["step", "tokens", "time"], help="x axis (default step)")
    p.add_argument("--names", nargs="+", help="legend names of the runs (default: the folder names)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from torchpeer.viz.plot import save_plot

    out = args.out or (os.path.join(args.run_dirs[0], "metrics.png") if len(args.run_dirs) == 1 else "runs.png")
    try:
        path = save_plot(args.run_dirs, out, x=args.x, names=args.names)
    except ImportError as e:  # matplotlib missing: one line, like the CLI's other errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
