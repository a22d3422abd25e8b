"""``python -m dynlrp_fx``: the command line (see :mod:`dynlrp_fx.cli`)."""

import sys

from .cli import main

sys.exit(main())
