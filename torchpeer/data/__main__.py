"""``python -m torchpeer.data ...`` = ``torchpeer data ...`` (the subcommand lives in torchpeer/cli/data.py)."""

import sys

from torchpeer.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
