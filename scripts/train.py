"""`python scripts/train.py ...` is `nmtkit train ...`: a thin wrapper for running from a checkout."""

import sys

from nmtkit.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
