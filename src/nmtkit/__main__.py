"""`python -m nmtkit ...` is the same as the `nmtkit` command."""

import sys

from .allocator import AllocatorChoiceError, reexec_with_faster_malloc


def run() -> int:
    """The `nmtkit` command: under jemalloc or mimalloc where this machine has one (allocator.py), then the CLI. It is the program's
    entry point only: called from a running interpreter (a REPL, a notebook) it would re-execute that interpreter."""
    try:
        reexec_with_faster_malloc()
    except AllocatorChoiceError as e:
        print(f"nmtkit: error: {e}", file=sys.stderr)
        return 2
    from .cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
