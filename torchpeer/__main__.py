"""``python -m torchpeer ...`` = ``torchpeer ...`` (the command line, torchpeer/cli)."""

import sys

from torchpeer.cli import main

sys.exit(main())
