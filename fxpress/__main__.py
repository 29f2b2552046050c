"""`python -m fxpress ...` runs the CLI (how `torchrun -m fxpress` starts it on every rank)."""

import sys

from fxpress.cli import main

sys.exit(main())
