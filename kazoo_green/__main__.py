"""``python -m kazoo_green``: the command line."""

import sys

from .cli import main

sys.exit(main())
