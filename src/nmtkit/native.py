"""nmtkit's own CPU kernels (`cpu_kernels.c`), built on first use.

- `DecodeStats`: the argmax or top-k of each step's logits and, for the per-token log, ln Z and the entropy. Torch's
  ops read the (B, V) logits four times for these (top-k, softmax, its product with the logits, a sum: ~400 us at
  64 x 8,000, against ~4 ms for the whole step); the kernel reads each row twice while it sits in L1 (~120 us).
- `AttendOne`: attention of the step's one query over the cached keys and values, read in memory order, with the
  scale, mask and softmax in the same call (torch: two batched matmuls and four small ops). A step ~10% faster.
- `ChunkLoss`: a chunk of the training loss (label-smoothed cross-entropy) and its gradient with respect to the
  logits, for `loss.py`'s chunk loop on CPU: 0.46 ms for 262 x 8,000 bf16 logits against 1.75 ms for torch's ops
  (two copies and about eight passes more).
No stock op fuses these passes, hence kernels of nmtkit's own.

Built with the system's C compiler (`$CC`, else `cc`, `gcc` or `clang`) for this CPU (`-march=native`) into a
per-user cache (`$NMTKIT_CACHE`, else `$XDG_CACHE_HOME/nmtkit` or `~/.cache/nmtkit`), named by a hash of the
source, the flags and the CPU, so one build serves every later process; it takes ~0.3 s. The build is written
under a temporary name and renamed, so processes building at once never load half a file. Loaded with ctypes.

Where it cannot be built or loaded (no compiler, a read-only cache, another platform) or with NMTKIT_NATIVE=0,
`kernels()` returns None, says why in the log once, and decoding and the loss run torch ops instead (the same tokens;
probabilities, losses and gradients equal up to fp32 rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]


class NativeBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    """Absolute: ctypes looks a bare file name (NMTKIT_CACHE=. gives one) up in the system's library folders."""
    if os.environ.get("NMTKIT_CACHE"):
        return Path(os.environ["NMTKIT_CACHE"]).absolute()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).absolute() / "nmtkit"
    try:
        return Path.home() / ".cache" / "nmtkit"
    except RuntimeError as e:  # no HOME and no passwd entry (some containers, `env -i`)
        raise NativeBuildError(f"no home folder for the kernel cache ({e}); set NMTKIT_CACHE to a writable folder") from e


def _cpu_signature() -> str:
    """What -march=native depends on: the architecture and, on Linux, the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags.strip()}"


def _compiler() -> list[str]:
    """The compiler command: $CC split like a shell would (`ccache gcc` works), else cc, gcc or clang."""
    command = shlex.split(os.environ.get("CC", ""))
    if not command:
        found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not found:
            raise NativeBuildError("no C compiler found (set CC, or install gcc or clang)")
        command = [found]
    return command


def build(source: Path = SOURCE, directory: Path | None = None, rebuild: bool = False) -> Path:
    """The shared library built from `source` for this CPU, from the cache unless `rebuild`.

    The cache key is the source, the flags and the CPU, not the compiler: a library once built loads without one.
    (To build with another compiler, delete the cache folder.)"""
    directory = cache_dir() if directory is None else directory
    identity = source.read_bytes() + " ".join(FLAGS).encode() + _cpu_signature().encode()
    target = directory / f"{source.stem}-{hashlib.sha256(identity).hexdigest()[:16]}.so"
    if target.exists() and not rebuild:
        return target
    compiler = _compiler()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise NativeBuildError(f"cannot write to the kernel cache {directory} ({e}); set NMTKIT_CACHE to a writable folder") from e
    name = " ".join(compiler)
    digest_tmp = directory / f".{target.name}.{secrets.token_hex(6)}.sha256.tmp"
    try:
        done = subprocess.run([*compiler, *FLAGS, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise NativeBuildError(f"{name} could not build {source.name}: {done.stderr.strip()[-800:]}")
        if os.path.getsize(tmp) == 0:
            raise NativeBuildError(f"{name} exited without writing a library for {source.name}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # readable by the other users of a shared cache, as a compiler's own output is
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before its name: a crash leaves no empty library under the real name
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, target)  # atomic: a process building at the same time replaces it with an equal file
        # then the library's digest, under a fresh name of its own first (mode 644 under the umask): `_load` checks it
        fd = os.open(digest_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(digest_tmp, _digest_file(target))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBuildError(f"{name} could not build {source.name}: {e}") from e
    finally:
        for leftover in (tmp, digest_tmp):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return target


def _untrusted(library: Path) -> str:
    """Why anyone at all could have written `library` (or could replace it), or "" where only those with write access
    to the cache folder the user chose could: the file must not be writable by all, nor its folder unless sticky, and
    in a folder everyone may write to (sticky, such as /tmp) it must be this user's or root's. A folder that only its
    owner or group may write to is trusted whoever wrote the file: a team cache, or a network mount that shows this
    user's files under another uid (NFS with root_squash, sshfs, CIFS)."""
    st, folder = library.stat(), library.parent.stat()
    if st.st_mode & stat.S_IWOTH:
        return "can be written by every user"
    if folder.st_mode & stat.S_IWOTH:
        if not folder.st_mode & stat.S_ISVTX:
            return f"lies in {library.parent}, where every user can replace it"
        if st.st_uid not in (os.getuid(), 0):
            return f"belongs to another user (uid {st.st_uid}) in {library.parent}, where every user can put files"
    return ""


def _digest_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _is_intact(library: Path) -> bool:
    """Whether the library's bytes are those its build wrote: a file cut short (a full disk, an interrupted copy) can
    crash the process inside the dynamic loader (SIGBUS) instead of failing to load."""
    try:
        return _digest_file(library).read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return False


_float_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class DecodeStats:
    """Top-k (with ids) of each row of (B, V) fp32 or bf16 logits, and optionally ln Z and the entropy (nats)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._f32 = library.nmtkit_decode_stats_f32
        self._f32.argtypes = [_float_p, _i64, _i64, ctypes.c_int, _float_p, _float_p, _float_p, _float_p]
        self._f32.restype = None
        self._bf16 = library.nmtkit_decode_stats_bf16
        self._bf16.argtypes = [*self._f32.argtypes, _float_p]
        self._bf16.restype = None

    def __call__(
        self,
        logits: Tensor,
        values: Tensor,
        ids: Tensor,
        log_z: Tensor | None = None,
        entropy: Tensor | None = None,
        scratch: Tensor | None = None,
    ) -> None:
        """Writes values (B, k) fp32 and ids (B, k) int64, descending, lower id first on ties; log_z and entropy
        (B,) fp32 when given (both or neither). bf16 logits need `scratch`, V fp32 values. All contiguous CPU tensors.
        A NaN logit is never chosen (torch's argmax would take it); a row with fewer than k logits above -inf gets
        the lowest free ids for the rest, so the k ids are always distinct and valid."""
        logits = logits.contiguous()
        B, V = logits.shape
        k = values.size(1)
        _expect(logits, (B, V), logits.dtype)
        _expect(values, (B, k), torch.float32)
        _expect(ids, (B, k), torch.int64)
        if not 1 <= k <= V:
            raise ValueError(f"top-k of {k} asked for over {V} logits")
        if (log_z is None) != (entropy is None):
            raise ValueError("log_z and entropy go together")
        stats = [None, None] if log_z is None or entropy is None else [_expect(log_z, (B,)), _expect(entropy, (B,))]
        args = [logits.data_ptr(), B, V, k, values.data_ptr(), ids.data_ptr(), *stats]
        if logits.dtype == torch.float32:
            self._f32(*args)
        elif logits.dtype == torch.bfloat16:
            if scratch is None:
                raise ValueError("bf16 logits need a scratch row of V fp32 values")
            self._bf16(*args, _expect(scratch, (V,)))
        else:
            raise TypeError(f"decode_stats takes fp32 or bf16 logits, not {logits.dtype}")


def _expect(t: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """t's data pointer, once it is checked to be a contiguous CPU tensor of this shape and dtype."""
    if t.shape != shape or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"a native kernel wants a contiguous CPU {dtype} tensor of shape {shape}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t.data_ptr()


class AttendOne:
    """Attention of one query per sentence and head, as `model.attend_one`: q (B, H, 1, D); keys and values
    (B, H, L, D), CPU views of one dtype (fp32 or bf16) with the same strides and contiguous rows; bias None or an
    additive (B or 1, 1, 1, L) mask -> (B, H, 1, D) in q's dtype.

    Returns None for inputs it does not take, and for fp32 keys when torch runs more than one thread (the kernel runs
    on one; torch's batched matmuls spread over several: at B = 64, L = 48 on two threads 199 µs against the kernel's
    352). The caller then uses torch ops. bf16 keys (caches made at one thread, `cpu_cache_dtype`) stay with the
    kernel at any thread count: torch's bf16 batched matmuls over them are 5-9x slower."""

    MAX_SCORES = 1 << 31  # B * H * L: the kernel's scratch is 4 bytes a score

    def __init__(self, library: ctypes.CDLL) -> None:
        self._attend = library.nmtkit_attend_one
        self._attend.argtypes = [
            _float_p, _float_p, _float_p, ctypes.c_int, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _float_p, _i64, ctypes.c_float, _float_p,
        ]
        self._attend.restype = ctypes.c_int

    def __call__(self, q: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None = None) -> Tensor | None:
        B, H, L, D = keys.shape
        if (
            (torch.get_num_threads() != 1 and keys.dtype != torch.bfloat16)  # over bf16 caches it beats torch's ops on any count
            or q.shape != (B, H, 1, D) or values.shape != keys.shape or keys.stride() != values.stride() or keys.stride(-1) != 1
            or keys.dtype not in (torch.float32, torch.bfloat16) or values.dtype != keys.dtype or not 0 < B * H * L <= self.MAX_SCORES
            or any(t.device.type != "cpu" for t in (q, keys, values))
            or (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad))
        ):
            return None
        if bias is not None:
            if bias.device.type != "cpu" or bias.dim() != 4 or bias.shape[1:] != (1, 1, L) or bias.size(0) not in (1, B):
                return None
            bias = bias.to(torch.float32).contiguous()
        query = torch.empty(B, H, D)
        query.copy_(q[:, :, 0])  # fp32, contiguous
        out = torch.empty(B, H, 1, D)
        sb, sh, sl, _ = keys.stride()
        rc = self._attend(
            query.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.dtype == torch.bfloat16, B, H, L, D, sl, sb, sh,
            None if bias is None else bias.data_ptr(), L if bias is not None and bias.size(0) == B else 0,
            D**-0.5, out.data_ptr(),
        )
        if rc != 0:
            raise MemoryError(f"attention scratch of {B * H * L * 4:,} bytes could not be allocated")
        return out.to(q.dtype)  # (itself when q is fp32)


class ChunkLoss:
    """One chunk of `loss._ChunkedCrossEntropy`'s rows: the summed label-smoothed cross-entropy of logits (n, V), fp32
    or bf16, contiguous on CPU, and d loss / d logits written over the logits (softmax - (1 - eps) onehot - eps / V, in
    the logits' dtype). targets (n,) int64 in [0, V), or negative for a row to ignore (padding), whose loss and
    gradient are 0 whatever its logits. Unlike torch's ops, a -inf logit gets probability ~1e-38 instead of 0.

    It runs on one thread: 262 x 8,000 bf16 logits take 0.46-0.53 ms against torch's ops' 1.75 ms on two threads and
    3.3 ms on one. Sharing the rows between two Python threads (ctypes lets go of the GIL) measured no faster on this
    2-core machine (0.536 vs 0.530 ms): torch's OpenMP threads still spin on the other core after the matmul."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._f32 = library.nmtkit_xent_chunk_f32
        self._f32.argtypes = [_float_p, _i64, _i64, _float_p, ctypes.c_float, _float_p]
        self._f32.restype = ctypes.c_double
        self._bf16 = library.nmtkit_xent_chunk_bf16
        self._bf16.argtypes = [*self._f32.argtypes, _float_p]
        self._bf16.restype = ctypes.c_double

    def __call__(self, logits: Tensor, targets: Tensor, smoothing: float) -> float:
        n, V = logits.shape
        _expect(logits, (n, V), logits.dtype)
        _expect(targets, (n,), torch.int64)
        if n and int(targets.max()) >= V:  # the kernel would read past the row
            raise IndexError(f"target id {int(targets.max())} out of range for {V} logits")
        if n and int(targets.min()) < -1:  # -1 marks a padded row; any other negative id is a bad label, not padding
            raise IndexError(f"target id {int(targets.min())} out of range for {V} logits")
        args = [logits.data_ptr(), n, V, targets.data_ptr(), smoothing, logits.data_ptr()]
        if logits.dtype == torch.float32:
            return float(self._f32(*args))
        if logits.dtype == torch.bfloat16:
            row = torch.empty(V, dtype=torch.float32)  # the widened row; held here while the kernel writes it
            return float(self._bf16(*args, row.data_ptr()))
        raise TypeError(f"chunk_loss takes fp32 or bf16 logits, not {logits.dtype}")


def cpu_cache_dtype(weights: torch.dtype) -> torch.dtype:
    """The dtype of a CPU decoding run's key/value caches.

    bf16 where the attention kernel will read them (bf16 weights, so the keys and values are bf16 already and lose
    nothing; nmtkit's kernels; one torch thread, as in every decoding worker; no autograd, which the kernel does not
    record): half the bytes to keep and read, so a worker's caches and weights fit the CPU's L3 better (one batch of
    the benchmark, one thread: 210 -> 182 ms). fp32 elsewhere: torch's batched matmuls of one query are several times
    faster over fp32 caches than bf16 ones.
    """
    if weights == torch.bfloat16 and torch.get_num_threads() == 1 and not torch.is_grad_enabled() and kernels() is not None:
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class Kernels:
    decode_stats: DecodeStats
    attend_one: AttendOne
    chunk_loss: ChunkLoss


@functools.cache
def kernels() -> Kernels | None:
    """The kernels, or None (with the reason logged once) where they can't be had: callers then use torch ops."""
    if os.environ.get("NMTKIT_NATIVE", "1") == "0":
        log.info("native kernels off (NMTKIT_NATIVE=0): decoding and the loss use torch ops")
        return None
    try:
        library = _load()
        return Kernels(DecodeStats(library), AttendOne(library), ChunkLoss(library))
    except Exception as e:  # whatever the reason, decoding goes on with torch ops
        log.info("native kernels unavailable (%s): decoding and the loss use torch ops, which are slower", e)
        return None


def _load() -> ctypes.CDLL:
    path = build()
    if not os.access(path, os.R_OK):  # another user's library that we may not read: leave it be
        raise NativeBuildError(f"cannot read {path}; set NMTKIT_CACHE to a folder of your own")
    if why := _untrusted(path):  # its name is predictable: in a folder everyone writes to, anyone could put one there
        message = f"{path} {why}; nmtkit loads only libraries that not every user can have written: set NMTKIT_CACHE to a folder of your own"
        log.warning("%s (decoding and the loss use torch ops, which are slower)", message)
        raise NativeBuildError(message)
    if not _is_intact(path):  # damaged, or built before libraries had digests: build it again
        try:
            path = build(rebuild=True)
        except NativeBuildError:
            if _digest_file(path).exists():
                raise
            # a library from before digests, in a cache we can't build into (another user's, read-only): loaded as
            # before; only a file cut short since (rare, and without a digest unknowable) could still crash the loader
            log.info("%s has no digest and can't be built again here; loading it as it is", path)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:  # the file is whole, so the folder is the problem: building again would not help
        raise NativeBuildError(
            f"{path} is whole but does not load ({e}); if {path.parent} is on a noexec mount, set NMTKIT_CACHE to another folder"
        ) from e

