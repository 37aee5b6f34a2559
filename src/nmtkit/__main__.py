"""`python -m nmtkit ...` is the same as the `nmtkit` command."""

import sys

from .allocator import reexec_with_jemalloc


def run() -> int:
    """The `nmtkit` command: under jemalloc where the system has it (allocator.py), then the CLI."""
    reexec_with_jemalloc()
    from .cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
