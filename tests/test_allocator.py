"""allocator.py: the `nmtkit` command re-executes itself once with jemalloc preloaded when the system has it,
never when told not to or when it already runs on it, and `import nmtkit` loads no torch before that choice."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from nmtkit.allocator import JEMALLOC_CONF, AllocatorChoiceError, preload_environment


def test_preloads_the_library_with_purging_off_and_marks_the_new_process() -> None:
    env = preload_environment({"PATH": "/bin"}, "libjemalloc.so.2")
    assert env == {"PATH": "/bin", "LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": JEMALLOC_CONF, "NMTKIT_MALLOC_PRELOADED": "1"}


def test_keeps_the_users_preloads_and_malloc_conf() -> None:
    env = preload_environment({"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:1"}, "libjemalloc.so.2")
    assert env is not None
    assert env["LD_PRELOAD"] == "libfoo.so:libjemalloc.so.2" and env["MALLOC_CONF"] == "narenas:1"  # the user's first


@pytest.mark.parametrize(
    "environ, library",
    [
        ({}, None),  # the system has no jemalloc
        ({"NMTKIT_MALLOC": "system"}, "libjemalloc.so.2"),  # the user keeps glibc's allocator
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "libjemalloc.so.2"),  # already preloaded by the user
        ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "libjemalloc.so.2"),  # the user chose another allocator
        ({"NMTKIT_MALLOC_PRELOADED": "1", "LD_PRELOAD": "libjemalloc.so.2"}, "libjemalloc.so.2"),  # the re-executed process
    ],
)
def test_nothing_to_do_gives_none(environ: dict, library: str | None) -> None:
    assert preload_environment(environ, library) is None


def test_an_unknown_nmtkit_malloc_value_names_the_choices() -> None:
    with pytest.raises(AllocatorChoiceError, match="NMTKIT_MALLOC='glibc': expected one of jemalloc, system"):
        preload_environment({"NMTKIT_MALLOC": "glibc"}, "libjemalloc.so.2")


def test_the_command_with_an_unknown_nmtkit_malloc_exits_2_naming_the_variable() -> None:
    env = {**_clean_env(), "NMTKIT_MALLOC": "off"}
    out = subprocess.run([sys.executable, "-m", "nmtkit", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "nmtkit: error: NMTKIT_MALLOC='off': expected one of jemalloc, system" in out.stderr


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "NMTKIT_MALLOC", "NMTKIT_MALLOC_PRELOADED")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return env


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("m"), reason="needs Linux and its libm")
def test_reexec_runs_the_same_command_line_once_with_the_library_preloaded() -> None:
    """libm stands in for jemalloc (present on every Linux): the print runs in the re-executed process only."""
    code = (
        "import os; from nmtkit.allocator import reexec_with_jemalloc; reexec_with_jemalloc(os.environ['LIB']); "
        "print(os.environ['LD_PRELOAD'], os.environ['MALLOC_CONF'], os.environ['NMTKIT_MALLOC_PRELOADED'])"
    )
    lib = ctypes.util.find_library("m")
    out = subprocess.run([sys.executable, "-c", code], env={**_clean_env(), "LIB": lib}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [lib, JEMALLOC_CONF, "1"]


def test_import_nmtkit_loads_no_torch_until_a_name_is_used() -> None:
    code = "import sys, nmtkit; a = 'torch' in sys.modules; nmtkit.Translator; print(a, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr


def _allocator_of_a_child(ld_preload: str) -> str:
    code = "from nmtkit.allocator import allocator_in_use; print(allocator_in_use())"
    env = {**_clean_env(), "LD_PRELOAD": ld_preload} if ld_preload else _clean_env()
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout.strip()


def test_allocator_in_use_reads_what_is_mapped_not_what_was_asked_for() -> None:
    assert _allocator_of_a_child("") == "system malloc"
    assert _allocator_of_a_child("libjemalloc.so.999") == "system malloc"  # the loader ignores a missing library


@pytest.mark.skipif(not ctypes.util.find_library("jemalloc"), reason="needs libjemalloc (apt install libjemalloc2)")
def test_allocator_in_use_sees_a_preloaded_jemalloc() -> None:
    assert _allocator_of_a_child(ctypes.util.find_library("jemalloc")) == "jemalloc"
