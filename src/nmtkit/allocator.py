"""jemalloc under the `nmtkit` command on Linux, when the system has it (`apt install libjemalloc2`).

glibc's malloc serves large tensors from fresh kernel pages and returns them when they are freed, so every step
page-faults on its activations again, and the batch shapes of training fragment its heap. jemalloc with page purging
off keeps freed pages for reuse. On 2 CPU cores (docs/performance.md) that made bf16 training 6-9% faster, greedy
decoding 7-17% faster, and lowered the benchmark's peak RSS from ~1,480 to ~1,235 MiB. An allocator has to be
preloaded before the process starts, so the command re-executes itself once with LD_PRELOAD set, before torch is
imported (as launchers such as ipexrun do, the preload and MALLOC_CONF are inherited by child processes).
NMTKIT_MALLOC=system keeps glibc's allocator; an allocator you preload yourself (any LD_PRELOAD naming a malloc) and a
MALLOC_CONF of your own are left as they are, and other preloads of yours come before jemalloc (AddressSanitizer's
runtime refuses to start unless it is first).

This module imports nothing heavy: it runs first.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # never hand freed pages back: no page faults on reuse
_MARKER = "NMTKIT_MALLOC_PRELOADED"  # set in the re-executed process, so it never re-executes again
CHOICES = ("jemalloc", "system")  # values of NMTKIT_MALLOC


class AllocatorChoiceError(ValueError):
    """NMTKIT_MALLOC holds something other than the CHOICES."""


def wants_jemalloc(environ: Mapping[str, str]) -> bool:
    """Whether this process should re-execute under jemalloc, judged from the environment alone (before any library
    search): not when NMTKIT_MALLOC=system, not in the re-executed process, not when the user preloads an allocator."""
    choice = environ.get("NMTKIT_MALLOC", "jemalloc")
    if choice not in CHOICES:
        raise AllocatorChoiceError(f"NMTKIT_MALLOC={choice!r}: expected one of {', '.join(CHOICES)} (unset means jemalloc)")
    return choice == "jemalloc" and not environ.get(_MARKER) and "malloc" not in environ.get("LD_PRELOAD", "")


def find_jemalloc() -> str | None:
    """The jemalloc shared library's name as the dynamic loader finds it (e.g. libjemalloc.so.2), or None."""
    return ctypes.util.find_library("jemalloc")


def preload_environment(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to re-execute with so that `library` is preloaded, or None when nothing is to be done:
    no library, or `wants_jemalloc` says no."""
    if library is None or not wants_jemalloc(environ):
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    env = dict(environ)
    # after the user's own preloads: those come first in symbol lookup (and ASan's runtime must come first of all)
    env["LD_PRELOAD"] = f"{preloaded}:{library}" if preloaded else library
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[_MARKER] = "1"
    return env


def reexec_with_jemalloc(library: str | None = None) -> None:
    """Replace this process with the same command line under jemalloc (see the module docstring); returns only
    when there is nothing to do or the re-execution failed (the command then runs on as it is)."""
    if not sys.platform.startswith("linux") or not wants_jemalloc(os.environ):
        return
    env = preload_environment(os.environ, library or find_jemalloc())
    if env is None:
        return
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as e:
        log.debug("re-executing under jemalloc failed (%s); running on the system allocator", e)


def allocator_in_use() -> str:
    """'jemalloc' when jemalloc is mapped into this process (read from /proc/self/maps on Linux, so a preload the
    loader ignored does not count), else 'system malloc'. For logs and benchmarks."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return "jemalloc" if "jemalloc" in maps.read() else "system malloc"
    except OSError:
        return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"
