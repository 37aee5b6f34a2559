"""`python -m nmtkit ...` is the same as the `nmtkit` command."""

import sys

from .allocator import AllocatorChoiceError, reexec_with_jemalloc


def run() -> int:
    """The `nmtkit` command: under jemalloc where the system has it (allocator.py), then the CLI. It is the program's
    entry point only: called from a running interpreter (a REPL, a notebook) it would re-execute that interpreter."""
    try:
        reexec_with_jemalloc()
    except AllocatorChoiceError as e:
        print(f"nmtkit: error: {e}", file=sys.stderr)
        return 2
    from .cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
