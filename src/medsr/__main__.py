"""``python -m medsr ...``: the command line (``medsr.cli``)."""

import sys

from medsr.cli import main

sys.exit(main())
