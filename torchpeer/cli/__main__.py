"""``python -m torchpeer.cli ...`` = ``torchpeer ...``."""

import sys

from torchpeer.cli import main

sys.exit(main())
