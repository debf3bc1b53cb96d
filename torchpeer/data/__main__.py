"""`python -m torchpeer.data ...`: the `torchpeer data` subcommand without the main CLI."""

import argparse
import sys

from .command import DESCRIPTION, EXAMPLES, add_data_arguments, run_data_subcommand


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchpeer.data",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_data_subcommand(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
