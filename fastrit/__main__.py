"""``python -m fastrit``: the command line (see :mod:`fastrit.cli`)."""

import sys

from .cli import main

sys.exit(main())
