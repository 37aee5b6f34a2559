"""`python scripts/translate.py ...` is `nmtkit translate ...`: a thin wrapper for running from a checkout."""

import sys

from nmtkit.cli import main

sys.exit(main(["translate", *sys.argv[1:]]))
