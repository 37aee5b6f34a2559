"""allocator.py: the `nmtkit` command re-executes itself once with jemalloc or mimalloc preloaded when this machine has
one, never when told not to or when it already runs on one, and `import nmtkit` loads no torch before that choice."""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nmtkit.allocator import (
    MIMALLOC_WHEEL_FILE,
    SETTINGS,
    AllocatorChoiceError,
    find_allocator,
    find_mimalloc,
    preload_environment,
)

JEMALLOC = ("jemalloc", "libjemalloc.so.2")
JEMALLOC_CONF = SETTINGS["jemalloc"]["MALLOC_CONF"]
MIMALLOC = ("mimalloc", "/venv/site-packages/cmeel.prefix/lib/libmimalloc.so")


def test_preloads_jemalloc_with_purging_off_and_marks_the_new_process() -> None:
    env = preload_environment({"PATH": "/bin"}, JEMALLOC)
    assert env == {"PATH": "/bin", "LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": JEMALLOC_CONF, "NMTKIT_MALLOC_PRELOADED": "1"}


def test_preloads_mimalloc_with_purging_off_and_marks_the_new_process() -> None:
    env = preload_environment({"PATH": "/bin"}, MIMALLOC)
    assert env == {"PATH": "/bin", "LD_PRELOAD": MIMALLOC[1], "MIMALLOC_PURGE_DELAY": "-1", "NMTKIT_MALLOC_PRELOADED": "1"}


def test_keeps_the_users_preloads_and_allocator_settings() -> None:
    env = preload_environment({"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:1"}, JEMALLOC)
    assert env is not None
    assert env["LD_PRELOAD"] == "libfoo.so:libjemalloc.so.2" and env["MALLOC_CONF"] == "narenas:1"  # the user's first
    env = preload_environment({"MIMALLOC_PURGE_DELAY": "100"}, MIMALLOC)
    assert env is not None and env["MIMALLOC_PURGE_DELAY"] == "100"


@pytest.mark.parametrize(
    "environ, found",
    [
        ({}, None),  # the machine has neither allocator
        ({"NMTKIT_MALLOC": "system"}, JEMALLOC),  # the user keeps glibc's allocator
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, JEMALLOC),  # already preloaded by the user
        ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, MIMALLOC),  # the user chose another allocator
        ({"NMTKIT_MALLOC_PRELOADED": "1", "LD_PRELOAD": "libjemalloc.so.2"}, JEMALLOC),  # the re-executed process
    ],
)
def test_nothing_to_do_gives_none(environ: dict, found: tuple[str, str] | None) -> None:
    assert preload_environment(environ, found) is None


@pytest.mark.parametrize(
    "wish, has, expected",
    [
        ("auto", {"jemalloc", "mimalloc"}, JEMALLOC),  # jemalloc first: leaner in fp32 training (1.5 against 1.6 GB)
        ("auto", {"mimalloc"}, MIMALLOC),  # a machine without libjemalloc2: the wheel's mimalloc
        ("auto", set(), None),
        ("mimalloc", {"jemalloc", "mimalloc"}, MIMALLOC),
        ("jemalloc", {"mimalloc"}, None),  # asked for one the machine lacks: none (the command says so)
        ("system", {"jemalloc", "mimalloc"}, None),
    ],
)
def test_find_allocator_follows_nmtkit_malloc(monkeypatch: pytest.MonkeyPatch, wish: str, has: set[str], expected) -> None:
    import nmtkit.allocator as allocator

    monkeypatch.setattr(allocator, "find_jemalloc", lambda: JEMALLOC[1] if "jemalloc" in has else None)
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: MIMALLOC[1] if "mimalloc" in has else None)
    assert find_allocator({"NMTKIT_MALLOC": wish}) == expected


def test_find_mimalloc_looks_in_the_search_path_for_the_wheels_library(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    assert find_mimalloc([str(tmp_path), str(site)]) is None
    (site / MIMALLOC_WHEEL_FILE).parent.mkdir(parents=True)
    (site / MIMALLOC_WHEEL_FILE).write_bytes(b"")
    assert find_mimalloc([str(tmp_path), str(site)]) == str((site / MIMALLOC_WHEEL_FILE).resolve())


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("m"), reason="needs Linux and its libm")
def test_python_m_never_preloads_a_library_from_the_working_directory(tmp_path: Path) -> None:
    """`python -m` puts the working directory (as an absolute path) first on sys.path; a libmimalloc.so planted there
    (libm stands in for it) must not be what the command preloads."""
    planted = tmp_path / MIMALLOC_WHEEL_FILE
    planted.parent.mkdir(parents=True)
    shutil.copy(_libm_path(), planted)
    (tmp_path / "probe.py").write_text(
        "import os, nmtkit.allocator as a; a.reexec_with_faster_malloc(); print(os.environ.get('LD_PRELOAD', 'none'))\n"
    )
    env = {**_clean_env(), "NMTKIT_MALLOC": "mimalloc"}
    out = subprocess.run([sys.executable, "-m", "probe"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path) not in out.stdout and str(planted.resolve()) not in out.stdout


def _libm_path() -> str:
    """libm's file, from where the loader put `cos` (find_library gives a name, not a path)."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    info = DlInfo()
    ctypes.CDLL(None).dladdr(ctypes.cast(ctypes.CDLL(ctypes.util.find_library("m")).cos, ctypes.c_void_p), ctypes.byref(info))
    return os.fsdecode(info.fname)


def test_an_unknown_nmtkit_malloc_value_names_the_choices() -> None:
    with pytest.raises(AllocatorChoiceError, match="NMTKIT_MALLOC='glibc': expected one of auto, jemalloc, mimalloc, system"):
        preload_environment({"NMTKIT_MALLOC": "glibc"}, JEMALLOC)


def test_the_command_with_an_unknown_nmtkit_malloc_exits_2_naming_the_variable() -> None:
    env = {**_clean_env(), "NMTKIT_MALLOC": "off"}
    out = subprocess.run([sys.executable, "-m", "nmtkit", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "nmtkit: error: NMTKIT_MALLOC='off': expected one of auto, jemalloc, mimalloc, system" in out.stderr


def _clean_env() -> dict[str, str]:
    drop = ("LD_PRELOAD", "NMTKIT_MALLOC", "NMTKIT_MALLOC_PRELOADED", *(key for s in SETTINGS.values() for key in s))
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return env


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("m"), reason="needs Linux and its libm")
def test_reexec_runs_the_same_command_line_once_with_the_library_preloaded() -> None:
    """libm stands in for jemalloc (present on every Linux): the print runs in the re-executed process only."""
    code = (
        "import os; from nmtkit.allocator import reexec_with_faster_malloc; "
        "reexec_with_faster_malloc(('jemalloc', os.environ['LIB'])); "
        "print(os.environ['LD_PRELOAD'], os.environ['MALLOC_CONF'], os.environ['NMTKIT_MALLOC_PRELOADED'])"
    )
    lib = ctypes.util.find_library("m")
    out = subprocess.run([sys.executable, "-c", code], env={**_clean_env(), "LIB": lib}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [lib, JEMALLOC_CONF, "1"]


@pytest.mark.parametrize("wish, hint", [("jemalloc", "apt install libjemalloc2"), ("mimalloc", "pip install cmeel-mimalloc")])
def test_asking_for_an_allocator_the_machine_lacks_says_how_to_get_it_and_runs_on(wish: str, hint: str) -> None:
    code = f"import nmtkit.allocator as a; a.find_{wish} = lambda: None; a.reexec_with_faster_malloc(); print('ran')"
    out = subprocess.run([sys.executable, "-c", code], env={**_clean_env(), "NMTKIT_MALLOC": wish}, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["ran"], out.stderr
    assert f"nmtkit: warning: NMTKIT_MALLOC={wish}: no {wish} library found ({hint}); using the system's malloc" in out.stderr


def test_an_unknown_nmtkit_malloc_is_refused_on_every_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    import nmtkit.allocator as allocator

    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    monkeypatch.setenv("NMTKIT_MALLOC", "bogus")
    with pytest.raises(AllocatorChoiceError, match="NMTKIT_MALLOC='bogus'"):
        allocator.reexec_with_faster_malloc()


def test_import_nmtkit_loads_no_torch_until_a_name_is_used() -> None:
    code = "import sys, nmtkit; a = 'torch' in sys.modules; nmtkit.Translator; print(a, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr


def _allocator_of_a_child(ld_preload: str, before: str = "pass") -> str:
    code = f"{before}; from nmtkit.allocator import allocator_in_use; print(allocator_in_use())"
    env = {**_clean_env(), "LD_PRELOAD": ld_preload} if ld_preload else _clean_env()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_allocator_in_use_reads_what_serves_malloc_not_what_was_asked_for() -> None:
    assert _allocator_of_a_child("") == "system malloc"
    assert _allocator_of_a_child("libjemalloc.so.999") == "system malloc"  # the loader ignores a missing library


def test_a_mapped_file_or_a_loaded_library_named_like_an_allocator_is_not_the_allocator(tmp_path: Path) -> None:
    data = tmp_path / "mimalloc-runs" / "jemalloc.bin"
    data.parent.mkdir()
    data.write_bytes(b"x" * 4096)
    mapped = f"import mmap; f = open({str(data)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)"
    assert _allocator_of_a_child("", mapped) == "system malloc"
    if (mimalloc := find_mimalloc()) is not None:  # dlopen'ed, not preloaded: glibc's malloc still serves the process
        assert _allocator_of_a_child("", f"import ctypes; ctypes.CDLL({mimalloc!r})") == "system malloc"


@pytest.mark.skipif(not ctypes.util.find_library("jemalloc"), reason="needs libjemalloc (apt install libjemalloc2)")
def test_allocator_in_use_sees_a_preloaded_jemalloc() -> None:
    assert _allocator_of_a_child(ctypes.util.find_library("jemalloc")) == "jemalloc"


@pytest.mark.skipif(find_mimalloc() is None, reason="needs the cmeel-mimalloc wheel (a dependency on Linux x86_64 and aarch64)")
def test_allocator_in_use_sees_the_wheels_mimalloc() -> None:
    assert _allocator_of_a_child(str(find_mimalloc())) == "mimalloc"


@pytest.mark.skipif(find_mimalloc() is None, reason="needs the cmeel-mimalloc wheel (a dependency on Linux x86_64 and aarch64)")
def test_a_process_re_executes_under_the_wheels_mimalloc_with_purging_off() -> None:
    """The whole path with the real library: found in site-packages, preloaded, serving malloc in the re-executed
    process, and reading the setting (mimalloc's verbose mode prints the options it runs with)."""
    code = "import nmtkit.allocator as a; a.reexec_with_faster_malloc(); print(a.allocator_in_use())"
    env = {**_clean_env(), "NMTKIT_MALLOC": "mimalloc", "MIMALLOC_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["mimalloc"], out.stderr
    assert "option 'purge_delay': -1" in out.stderr
