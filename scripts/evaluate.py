"""`python scripts/evaluate.py ...` is `nmtkit evaluate ...`: a thin wrapper for running from a checkout."""

import sys

from nmtkit.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
