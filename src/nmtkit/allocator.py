"""A malloc that keeps freed pages for reuse, under the `nmtkit` command on Linux: jemalloc where the system has it
(`apt install libjemalloc2`), else mimalloc from the `cmeel-mimalloc` wheel, which `pip install nmtkit` brings on Linux
x86_64 and aarch64.

glibc's malloc serves large tensors from fresh kernel pages and returns them when they are freed, so every step
page-faults on its activations again, and the batch shapes of training fragment its heap. jemalloc and mimalloc, with
freed pages kept, do neither (docs/performance.md, 2 CPU cores): the benchmark's bf16 training peaks at ~1,140 MiB of
RSS under either against ~1,290 under glibc's, 90 s of the bf16 quick start at 1,507 MiB (jemalloc) or 1,342 (mimalloc)
against 2,028, and fp32 training can take oneDNN's faster products (cpu_matmul.py). jemalloc also made training 6-9%
and decoding 7-17% faster in the fourth session; mimalloc measured as fast as glibc's malloc. An allocator has to be
preloaded before the process starts, so the command re-executes itself once with LD_PRELOAD set, before torch is
imported (as launchers such as ipexrun do). Child processes inherit the preload and the allocator's settings; pyarrow's
own mimalloc pool reads MIMALLOC_PURGE_DELAY too.

NMTKIT_MALLOC chooses: `auto` (unset: jemalloc, else mimalloc, else the system's), `jemalloc`, `mimalloc`, or `system`.
An allocator you preload yourself (any LD_PRELOAD naming a malloc) and settings of your own (MALLOC_CONF,
MIMALLOC_PURGE_DELAY) are left as they are, and other preloads of yours come before ours (AddressSanitizer's runtime
refuses to start unless it is first).

This module imports nothing heavy: it runs first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import site
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# each allocator's settings: never hand freed pages back to the kernel, so reusing them costs no page faults
# (mimalloc's default purges after 10 ms: in one 90 s run of fp32 training, 21x the page faults and 11% fewer steps)
SETTINGS = {
    "jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
    "mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"},
}
_MARKER = "NMTKIT_MALLOC_PRELOADED"  # set in the re-executed process, so it never re-executes again
CHOICES = ("auto", "jemalloc", "mimalloc", "system")  # values of NMTKIT_MALLOC
MIMALLOC_WHEEL_FILE = Path("cmeel.prefix", "lib", "libmimalloc.so")  # where cmeel-mimalloc puts it, in site-packages


class AllocatorChoiceError(ValueError):
    """NMTKIT_MALLOC holds something other than the CHOICES."""


def choice(environ: Mapping[str, str]) -> str:
    """NMTKIT_MALLOC's value ('auto' when unset), or an AllocatorChoiceError naming what it holds."""
    value = environ.get("NMTKIT_MALLOC", "auto")
    if value not in CHOICES:
        raise AllocatorChoiceError(f"NMTKIT_MALLOC={value!r}: expected one of {', '.join(CHOICES)} (unset means auto)")
    return value


def wants_preload(environ: Mapping[str, str]) -> bool:
    """Whether this process should re-execute under another allocator, judged from the environment alone (before any
    library search): not when NMTKIT_MALLOC=system, not in the re-executed process, not when the user preloads one."""
    return choice(environ) != "system" and not environ.get(_MARKER) and "malloc" not in environ.get("LD_PRELOAD", "")


def find_jemalloc() -> str | None:
    """The jemalloc shared library's name as the dynamic loader finds it (e.g. libjemalloc.so.2), or None."""
    return ctypes.util.find_library("jemalloc")


def find_mimalloc(search_path: list[str] | None = None) -> str | None:
    """The path of the cmeel-mimalloc wheel's libmimalloc.so in the first of `search_path` (default: the site-packages
    folders that pip installs into, this environment's first) that has it, or None. Never sys.path: `python -m` puts
    the working directory there, and a library is not preloaded from whatever folder the command runs in."""
    if search_path is None:
        search_path = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    for folder in search_path:
        candidate = Path(folder) / MIMALLOC_WHEEL_FILE
        if candidate.is_file():
            return str(candidate.resolve())
    return None


def find_allocator(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(name, library) of the allocator NMTKIT_MALLOC asks for and this machine has, or None: auto tries jemalloc,
    then mimalloc."""
    wish = choice(environ)
    finders = {"jemalloc": find_jemalloc, "mimalloc": find_mimalloc}
    for name in ("jemalloc", "mimalloc") if wish == "auto" else (wish,) if wish in finders else ():
        if (library := finders[name]()) is not None:
            return name, library
    return None


def preload_environment(environ: Mapping[str, str], found: tuple[str, str] | None) -> dict[str, str] | None:
    """The environment to re-execute with so that `found` (name, library) is preloaded with its SETTINGS, or None
    when nothing is to be done: no library, or `wants_preload` says no."""
    if found is None or not wants_preload(environ):
        return None
    name, library = found
    preloaded = environ.get("LD_PRELOAD", "")
    env = dict(environ)
    # after the user's own preloads: those come first in symbol lookup (and ASan's runtime must come first of all)
    env["LD_PRELOAD"] = f"{preloaded}:{library}" if preloaded else library
    for key, value in SETTINGS[name].items():
        env.setdefault(key, value)
    env[_MARKER] = "1"
    return env


MISSING_HINTS = {"jemalloc": "apt install libjemalloc2", "mimalloc": "pip install cmeel-mimalloc"}


def reexec_with_faster_malloc(found: tuple[str, str] | None = None) -> None:
    """Replace this process with the same command line under jemalloc or mimalloc (see the module docstring); returns
    only when there is nothing to do or the re-execution failed (the command then runs on as it is). An NMTKIT_MALLOC
    that is not one of the CHOICES raises AllocatorChoiceError on every platform."""
    wish = choice(os.environ)
    if not wants_preload(os.environ):
        return
    if not sys.platform.startswith("linux"):
        if wish in MISSING_HINTS:
            print(f"nmtkit: warning: NMTKIT_MALLOC={wish}: preloading an allocator is done on Linux only; using the system's malloc", file=sys.stderr)
        return
    env = preload_environment(os.environ, found or find_allocator(os.environ))
    if env is None:
        if wish in MISSING_HINTS:
            print(f"nmtkit: warning: NMTKIT_MALLOC={wish}: no {wish} library found ({MISSING_HINTS[wish]}); using the system's malloc", file=sys.stderr)
        return
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as e:
        log.debug("re-executing under another allocator failed (%s); running on the system allocator", e)


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def malloc_library() -> str | None:
    """The file of the shared object whose `malloc` this process calls (dladdr of the symbol the dynamic linker
    resolves), or None where that cannot be asked (not glibc, not Linux)."""
    try:
        process = ctypes.CDLL(None)
        try:
            dladdr = process.dladdr  # in libc since glibc 2.34
        except AttributeError:
            dladdr = ctypes.CDLL("libdl.so.2").dladdr
        info = _DlInfo()
        if not dladdr(ctypes.cast(process.malloc, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.fsdecode(info.dli_fname)
    except (OSError, AttributeError, TypeError):
        return None


def allocator_in_use() -> str:
    """'jemalloc' or 'mimalloc' when that library serves this process's malloc, else 'system malloc' (also where this
    cannot be told). Not what is mapped: a library loaded but not preloaded, or a file whose path holds the name, would
    say nothing about malloc. For logs, benchmarks and cpu_matmul's rule."""
    name = os.path.basename(malloc_library() or "")
    return next((lib for lib in ("jemalloc", "mimalloc") if name.startswith(f"lib{lib}.")), "system malloc")
