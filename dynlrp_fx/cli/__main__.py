"""``python -m dynlrp_fx.cli``: the same as ``python -m dynlrp_fx``."""

import sys

from . import main

sys.exit(main())
