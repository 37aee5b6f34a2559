"""`python -m nmtkit ...` is the same as the `nmtkit` command."""

import sys

from .cli import main

sys.exit(main())
