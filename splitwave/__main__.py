"""`python -m splitwave ...` is `splitwave ...` (a device without the console script, or another venv)."""

import sys

from splitwave.cli import main

sys.exit(main())
