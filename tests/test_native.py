"""nmtkit's native kernels: built once per CPU into the cache, reused without a compiler, and where they can't
be built or loaded, decoding falls back to torch ops with the reason in the log. (Their results: test_decode.py and
test_model.py.)"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from nmtkit import loss, native
from nmtkit.decode import greedy_decode
from nmtkit.loss import projected_cross_entropy
from nmtkit.tokenizer import PAD_ID
from test_model import make_model, native_kernels, random_ids


def has_compiler() -> bool:
    return any(shutil.which(c) for c in ("cc", "gcc", "clang"))


needs_compiler = pytest.mark.skipif(not has_compiler(), reason="no C compiler on this machine: the torch path is used")


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """An empty kernel cache, and kernels() asked afresh."""
    monkeypatch.setenv("NMTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NMTKIT_NATIVE", raising=False)
    native.kernels.cache_clear()
    yield tmp_path / "cache"
    native.kernels.cache_clear()


@needs_compiler
def test_kernel_is_built_once_then_loaded_from_the_cache_without_a_compiler(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = native.build()
    assert path.parent == cache and path.read_bytes()[:4] == b"\x7fELF"
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # the temporary name was renamed
    monkeypatch.setenv("CC", str(cache / "no-such-compiler"))
    built_at = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == built_at
    assert native.kernels() is not None


def test_without_a_compiler_decoding_uses_torch_ops_and_the_log_says_why(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", str(cache.parent / "no-such-compiler"))
    with caplog.at_level(logging.INFO, logger="nmtkit.native"):
        assert native.kernels() is None
    assert "no-such-compiler" in caplog.text and "torch ops" in caplog.text
    assert not cache.exists() or not list(cache.iterdir())  # nothing half-written left behind
    out = greedy_decode(make_model(), random_ids(3, 7), 6, top_k=3)  # decoding goes on
    assert out.tokens.shape[0] == 3 and out.probs is not None and (out.probs > 0).all()


@needs_compiler
def test_a_source_that_does_not_compile_names_the_file_and_the_compiler_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int broken(void) { return 1 +; }\n")
    with pytest.raises(native.NativeBuildError, match=r"broken\.c.*error"):
        native.build(broken, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix in (".tmp", ".so")]


def test_an_unwritable_cache_names_the_folder_and_what_to_set(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(native.NativeBuildError, match=r"a-file/cache.*NMTKIT_CACHE"):
        native.build(directory=blocker / "cache")


@needs_compiler
def test_a_damaged_library_in_the_cache_is_built_again(cache: Path) -> None:
    path = native.build()
    path.write_bytes(b"half a file")
    assert native.kernels() is not None
    assert path.read_bytes()[:4] == b"\x7fELF"


@needs_compiler
def test_a_library_cut_short_is_built_again_instead_of_crashing_the_loader(cache: Path) -> None:
    """Half a real library has a valid ELF header: loading it would die of SIGBUS inside dlopen. Its digest differs,
    so it is built again first (in a child process: a crash must not take the test run down)."""
    import subprocess
    import sys

    path = native.build()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code = "from nmtkit import native; assert native.kernels() is not None"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NMTKIT_CACHE": str(cache)}, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert native._is_intact(path)


@needs_compiler
def test_a_whole_library_that_does_not_load_names_the_folder_and_is_not_rebuilt(cache: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    path = native.build()
    built_at = path.stat().st_mtime_ns

    def noexec(name: str, *args, **kwargs):
        raise OSError(f"{name}: failed to map segment from shared object")

    monkeypatch.setattr(native.ctypes, "CDLL", noexec)  # as on a folder mounted noexec
    with caplog.at_level(logging.INFO, logger="nmtkit.native"):
        assert native.kernels() is None
    assert "is whole but does not load" in caplog.text and "noexec" in caplog.text and "NMTKIT_CACHE" in caplog.text
    assert path.stat().st_mtime_ns == built_at  # building again would not help, and every process would pay for it


@needs_compiler
def test_a_library_from_before_digests_loads_where_it_cannot_be_built_again(cache: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    path = native.build()
    native._digest_file(path).unlink()  # as a cache filled by an earlier nmtkit
    monkeypatch.setenv("CC", str(cache / "no-such-compiler"))  # and no way to build here
    with caplog.at_level(logging.INFO, logger="nmtkit.native"):
        assert native.kernels() is not None
    assert "has no digest and can't be built again here" in caplog.text


def test_nmtkit_native_0_turns_the_kernel_off_without_building(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NMTKIT_NATIVE", "0")
    assert native.kernels() is None
    assert not cache.exists()


@needs_compiler
def test_kernel_refuses_buffers_that_do_not_fit(cache: Path) -> None:
    kernels = native.kernels()
    assert kernels is not None
    kernel = kernels.decode_stats
    logits = torch.randn(4, 100)
    values, ids = torch.empty(4, 3), torch.empty(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="int64"):
        kernel(logits, values, ids.float())
    with pytest.raises(ValueError, match=r"\(4,\)"):
        kernel(logits, values, ids, torch.empty(3), torch.empty(4))
    with pytest.raises(ValueError, match="go together"):
        kernel(logits, values, ids, torch.empty(4))
    with pytest.raises(ValueError, match="scratch"):
        kernel(logits.bfloat16(), values, ids)
    with pytest.raises(ValueError, match="top-k of 200"):
        kernel(logits, torch.empty(4, 200), torch.empty(4, 200, dtype=torch.long))
    with pytest.raises(TypeError, match="float16"):
        kernel(logits.half(), values, ids)
    kernel(logits.t().contiguous().t(), values, ids)  # a non-contiguous view is made contiguous first
    assert torch.equal(ids, logits.topk(3).indices)


@needs_compiler
def test_the_library_is_readable_by_the_other_users_of_a_shared_cache(cache: Path) -> None:
    umask = os.umask(0o022)
    try:
        path = native.build()
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # mkstemp's 0600 would lock them out


@needs_compiler
def test_a_library_we_may_not_read_is_left_alone_and_named(cache: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    path = native.build()
    path.write_bytes(b"someone else's")  # does not load; and os.access says we may not read it
    monkeypatch.setattr(native.os, "access", lambda *args: False)
    with caplog.at_level(logging.INFO, logger="nmtkit.native"):
        assert native.kernels() is None
    assert f"cannot read {path}" in caplog.text and "NMTKIT_CACHE" in caplog.text
    assert path.read_bytes() == b"someone else's"  # not deleted from under its owner


def test_no_home_folder_falls_back_to_torch_ops_naming_nmtkit_cache(cache: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.delenv("NMTKIT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native.Path, "home", no_home)
    with caplog.at_level(logging.INFO, logger="nmtkit.native"):
        assert native.kernels() is None
    assert "no home folder" in caplog.text and "NMTKIT_CACHE" in caplog.text


@needs_compiler
def test_cc_with_arguments_is_split_like_a_shell_would(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    monkeypatch.setenv("CC", f"{compiler} -std=c11")
    assert native.build().read_bytes()[:4] == b"\x7fELF"


def test_a_compiler_that_writes_nothing_leaves_no_empty_library(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "true")  # exits 0, writes nothing
    with pytest.raises(native.NativeBuildError, match="without writing a library"):
        native.build()
    assert not cache.exists() or not list(cache.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunk_kernel_gives_the_torch_ops_loss_and_gradient_at_the_vocabulary_size(dtype: torch.dtype) -> None:
    """At the bench shape (V = 8,000; logits spread like a trained model's), with padding rows and label smoothing:
    the same loss and gradient as the torch ops to fp32 rounding, and in bf16 the gradient rounded the same way."""
    native_kernels()
    torch.manual_seed(5)
    hidden, weight = torch.randn(300, 64), torch.randn(8000, 64) * 0.5
    targets = torch.randint(4, 8000, (300,))
    targets[::9] = PAD_ID
    kwargs = dict(ignore_index=PAD_ID, label_smoothing=0.1, compute_dtype=dtype, chunk_rows=128)

    def loss_and_grads() -> tuple[torch.Tensor, ...]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = projected_cross_entropy(h, w, targets, **kwargs)
        return (loss, *torch.autograd.grad(loss, [h, w]))

    calls: list[int] = []
    with pytest.MonkeyPatch.context() as m:  # count the kernel's calls: the comparison must not be torch against torch
        real = loss.chunk_kernel  # the real choice of path, its kernel wrapped in a counter
        m.setattr(loss, "chunk_kernel", lambda device, dtype: (k := real(device, dtype)) and (lambda *a: calls.append(1) or k(*a)))
        with_kernel = loss_and_grads()
    assert len(calls) == 3  # 300 rows in chunks of 128
    with pytest.MonkeyPatch.context() as m:
        m.setattr(native, "kernels", lambda: None)
        with_torch = loss_and_grads()
    torch.testing.assert_close(with_kernel[0], with_torch[0], rtol=1e-6, atol=0.0)
    for got, want in zip(with_kernel[1:], with_torch[1:]):  # bf16: a gradient's bf16 rounding may differ by one step
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 1e-3)


def test_the_chunk_kernel_refuses_a_target_outside_the_vocabulary() -> None:
    logits = torch.randn(3, 10)
    with pytest.raises(IndexError, match="target id 10 out of range for 10 logits"):
        native_kernels().chunk_loss(logits, torch.tensor([1, 10, -1]), 0.1)
    # -1 marks padding; another negative id is a bad label, which F.cross_entropy refuses too (not a row left out)
    with pytest.raises(IndexError, match="target id -2 out of range for 10 logits"):
        native_kernels().chunk_loss(logits, torch.tensor([1, -2, -1]), 0.1)


@needs_compiler
@pytest.mark.parametrize(
    ("folder_mode", "library_mode", "why"),
    [
        (0o777, 0o755, "where every user can replace it"),
        (0o755, 0o757, "can be written by every user"),
        (0o1777, 0o755, ""),
        (0o775, 0o775, ""),
    ],
    ids=["world-writable folder", "world-writable library", "sticky folder", "umask 002"],
)
def test_a_library_anyone_could_have_written_is_not_loaded(cache: Path, folder_mode: int, library_mode: int, why: str, caplog) -> None:
    """Its name is predictable (a digest of the source, the flags and the CPU): where everyone can write, anyone could
    have put a library of their own under it. A sticky folder, such as /tmp, lets nobody replace another's file; group
    write is what a umask of 002 gives every folder."""
    path = native.build()
    os.chmod(path, library_mode)
    os.chmod(cache, folder_mode)
    with caplog.at_level(logging.INFO, logger="nmtkit.native"):
        loaded = native.kernels()
    assert (loaded is None) == bool(why)
    if why:
        assert why in caplog.text and "set NMTKIT_CACHE to a folder of your own" in caplog.text


@needs_compiler
@pytest.mark.parametrize(("folder_mode", "loads"), [(0o1777, False), (0o755, True)], ids=["sticky /tmp-like folder", "own folder"])
def test_another_users_library_loads_only_from_a_folder_not_everyone_writes_to(
    cache: Path, monkeypatch: pytest.MonkeyPatch, folder_mode: int, loads: bool, caplog
) -> None:
    """In /tmp anyone can put a file under the predictable name. In a folder only its owner or group write to (a team
    cache, or a network mount that shows this user's files under another uid) the file is whoever wrote it there."""
    path = native.build()
    os.chmod(cache, folder_mode)
    real_uid = os.getuid()
    monkeypatch.setattr(native.os, "getuid", lambda: real_uid + 4242)  # as if another user had built it
    if real_uid == 0:  # root's libraries are trusted by everyone: be another user, and the library someone else's
        os.chown(path, 4243, -1)
    with caplog.at_level(logging.INFO, logger="nmtkit.native"):
        assert (native.kernels() is not None) == loads
    if not loads:
        assert "belongs to another user" in caplog.text


@needs_compiler
def test_a_relative_kernel_cache_is_built_into_and_loaded_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ctypes looks a bare file name up in the system's library folders, not the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NMTKIT_CACHE", ".")
    monkeypatch.delenv("NMTKIT_NATIVE", raising=False)
    native.kernels.cache_clear()
    try:
        assert native.kernels() is not None
    finally:
        native.kernels.cache_clear()

