"""``python -m torchpeer.experiments sweep|report ...``: the two commands without the main CLI."""

from __future__ import annotations

import argparse
import sys

from torchpeer.experiments import report_command, sweep_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchpeer.experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    sweep_command.add_parser(sub)
    report_command.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
