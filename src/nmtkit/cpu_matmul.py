"""fp32 matrix products on CPU through oneDNN, on CPUs where torch's default BLAS leaves half the CPU unused.

torch sends fp32 `F.linear` and `torch.mm` on CPU to MKL, which chooses its kernels by the CPU's vendor: on
non-Intel CPUs it runs its AVX2 code even where AVX-512 is there, half the multiply-adds per cycle. oneDNN, which
torch ships as well (it runs the bf16 path), chooses by instruction set. On a 2-core AMD EPYC (Zen 5), 2 threads, at
the SMALL model's shapes: MKL 190-214 GFLOP/s, oneDNN 460-490, in the same fp32 arithmetic (no reduced-precision
mode; the results differ from MKL's only by summation order, ~1e-7 relative).

The choice is a rule, not a timing: oneDNN where torch runs AVX-512 code and the CPU is not Intel's (exactly where
MKL falls back to AVX2) and the process runs under jemalloc or mimalloc (allocator.py), MKL elsewhere. Under glibc's
malloc the oneDNN path fragments the heap as batch shapes vary: 90 seconds of the fp32 quick start peaked at 2.6-3.1 GB
of RSS against 1.3 GB with MKL's products (and 1,533 MiB with oneDNN's under jemalloc, 1,676 MiB under mimalloc). A
timed probe was tried first; its cold BLAS timing is bimodal under glibc's malloc, so two identical processes could
choose differently, and a resumed run would then sum in another order than the run it resumes. NMTKIT_CPU_MATMUL=onednn
or =blas overrides the rule.

`Linear` (the model's projections) and `mm_nt`/`mm_nn`/`mm_tn` (the loss's chunked projection) take the oneDNN path
only for fp32 CPU tensors outside autocast and outside `torch.compile`; everything else is torch's own op.
`Linear` keeps nn.Linear's parameters and state dict; `torch.func` transforms and `quantize_dynamic({nn.Linear})`
do not see through it (use `torch.nn.Linear` models, or NMTKIT_CPU_MATMUL=blas, for those).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .allocator import allocator_in_use

log = logging.getLogger(__name__)

# oneDNN (this module's fp32 path and the bf16 path) caches a compiled kernel per distinct shape, up to 1,024 of
# them. Length-bucketed batches have hundreds of shapes, and the cache alone grew a 10-minute CPU run to 5 GB of
# RSS; 32 entries keep it bounded at the same speed. Read lazily by oneDNN, so setting it at import (before the
# first kernel) works; a value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")

CHOICES = ("auto", "onednn", "blas")  # values of NMTKIT_CPU_MATMUL
_chosen: str | None = None  # "onednn" or "blas" once decided
_reason = ""


class MatmulChoiceError(ValueError):
    """NMTKIT_CPU_MATMUL holds something other than the CHOICES."""


def _onednn_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


def _lp(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x (M, K) @ w (N, K).T + b through oneDNN. Strided operands are read as they are, except zero strides (an
    expanded tensor, such as the gradient of a sum), which oneDNN reads ~1,000x slower than a contiguous copy."""
    x, w = (t.contiguous() if 0 in t.stride() else t for t in (x, w))
    return _onednn_linear(x, w, b)


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")


def cpu_vendor() -> str:
    """The CPU's vendor string ('GenuineIntel', 'AuthenticAMD', ...) from /proc/cpuinfo, or '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def wanted() -> str:
    """NMTKIT_CPU_MATMUL's value ('auto' when unset), or a MatmulChoiceError naming what it holds."""
    wish = os.environ.get("NMTKIT_CPU_MATMUL", "auto")
    if wish not in CHOICES:
        raise MatmulChoiceError(f"NMTKIT_CPU_MATMUL={wish!r}: expected one of {', '.join(CHOICES)} (unset means auto)")
    return wish


def backend() -> str:
    """'onednn' or 'blas': the fp32 CPU matmul path of this process, chosen on the first call (see module doc)."""
    global _chosen, _reason
    if _chosen is None:
        wish = wanted()
        if not _onednn_available():
            _chosen, _reason = "blas", "blas (this torch has no oneDNN linear)"
        elif wish != "auto":
            _chosen, _reason = wish, f"{wish} (NMTKIT_CPU_MATMUL)"
        else:
            isa, vendor = torch.backends.cpu.get_cpu_capability(), cpu_vendor()
            if not (isa.startswith("AVX512") and vendor and vendor != "GenuineIntel"):
                _chosen, _reason = "blas", f"blas ({vendor or 'unknown'} CPU, {isa}: MKL uses what the CPU has)"
            elif allocator_in_use() == "system malloc":
                _chosen, _reason = "blas", (
                    f"blas ({vendor} CPU with {isa}, but under glibc's malloc oneDNN's fp32 products fragment the heap "
                    "(2.6-3.1 GB of RSS against 1.3 in 90 s of training); run the `nmtkit` command, which preloads jemalloc or "
                    "mimalloc where installed (libjemalloc2, or pip's cmeel-mimalloc), for the faster oneDNN path)"
                )
            else:
                _chosen, _reason = "onednn", f"onednn ({vendor} CPU with {isa}: MKL would run its AVX2 code)"
        log.debug("fp32 CPU matmuls: %s", _reason)
    return _chosen


def describe() -> str:
    """The choice and why, for the runtime's log line ('fp32 matmuls -> ...')."""
    backend()
    return _reason


def _takes_onednn(*operands: Tensor) -> bool:
    """Whether a product of these operands goes through oneDNN: fp32 CPU tensors, none of them empty (oneDNN refuses
    a product with a zero-sized side, which torch's op handles), outside autocast and `torch.compile`."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 for t in operands)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and backend() == "onednn"
    )


def mm_nt(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a (M, K) @ b (N, K).T. `out`, a buffer for torch's op, is written on that path only: oneDNN returns a
    tensor of its own (a copy into `out` would cost another pass over the product). Use the result."""
    if _takes_onednn(a, b):
        return _lp(a, b)
    return torch.mm(a, b.T, out=out) if out is not None else a @ b.T


def mm_nn(a: Tensor, b: Tensor) -> Tensor:
    """a (M, K) @ b (K, N)."""
    return _lp(a, b.T) if _takes_onednn(a, b) else a @ b


def mm_nn_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out (M, N) = a (M, K) @ b (K, N), written in place (torch's op writes it directly, oneDNN's result is copied)."""
    if _takes_onednn(a, b):
        out.copy_(_lp(a, b.T))
    else:
        torch.mm(a, b, out=out)


def add_mm_tn_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (M, N) += a (K, M).T @ b (K, N), in place: a weight gradient summed over chunks of rows."""
    if _takes_onednn(a, b):
        acc += mm_tn(a, b)
    else:
        acc.addmm_(a.T, b)


def mm_tn(a: Tensor, b: Tensor) -> Tensor:
    """a (K, M).T @ b (K, N): a weight gradient, reducing over the K rows of both.

    oneDNN is fastest when the result's longer side is its columns, so the narrower result is formed and
    transposed back when that is the way round (measured: 410 against 150-280 GFLOP/s the other way).
    """
    if not _takes_onednn(a, b):
        return a.T @ b
    if a.size(1) >= b.size(1):
        return _lp(b.T, a.T).T
    return _lp(a.T, b.T)


class _OneDnnLinear(torch.autograd.Function):
    """x (M, K), weight (N, K), bias (N,) or None -> (M, N); 2-D only, so that its output is a fresh tensor (a view made
    inside a Function could not be modified in place afterwards, as nn.Linear's output can)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _lp(x, weight, bias)

    @staticmethod
    @once_differentiable  # oneDNN's op has no derivative of its own: a second derivative must fail loudly
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad
        grad_x = _lp(grad, weight.T) if needs_x else None
        grad_w = mm_tn(grad, x) if needs_w else None
        grad_b = grad.sum(0) if needs_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, through oneDNN for fp32 CPU tensors where `backend()` chose it."""
    if _takes_onednn(x, weight):
        y = _OneDnnLinear.apply(x.reshape(-1, x.size(-1)), weight, bias)
        return y.view(*x.shape[:-1], weight.size(0))
    return F.linear(x, weight, bias)


class PackedWeight:
    """The weight `owner.<name>`, (N, K), reordered once into oneDNN's blocked layout, for products outside autograd:
    decoding on CPU.

    torch's bf16 `F.linear`, and `linear`'s fp32 oneDNN path, reorder the weight into that layout inside every call.
    Packed once (`Transformer.pack_for_cpu`, which `for_inference` calls), the products of a greedy decoding step ran
    7-15% faster alone at batch 64 on one thread, with identical results, and a ReLU that follows can be fused in.
    Only weights whose products take oneDNN are packed: bf16 ones on CPU, and fp32 ones where `backend()` chose it.

    The packed copy follows the weight. It is packed again at the next product when the owner holds another tensor
    (`load_state_dict(assign=True)`, a replaced layer) or the same one changed in place (an optimizer step,
    `load_state_dict`), which its version counter records. A change made through `.data` bypasses that counter and is
    not seen: call `pack_for_cpu()` again after one. Tensors made under `torch.inference_mode` have no version counter,
    so they are not packed. `.to()` and its kind drop the packed copy (`Linear._apply`, `Transformer._apply`), and a
    copy (`copy.deepcopy`, pickle) starts without one: both pack again at their next product on CPU.
    """

    def __init__(self, owner: nn.Module, name: str = "weight", pack_now: bool = True) -> None:
        self.owner, self.name = owner, name
        # (the weight, its data pointer, its version, its storage kept alive, the blocked copy or None where the weight
        # is not packed). Replaced whole, never changed: a thread reads it once and sees one consistent state. Holding
        # the storage keeps its address from being reused by a new tensor that the key could not tell apart.
        self._state: tuple | None = None
        if pack_now:
            self._refresh(getattr(owner, name))

    def __reduce__(self) -> tuple:  # the blocked copy is opaque: a copy packs again at its first product
        return (PackedWeight, (self.owner, self.name, False))

    def drop(self) -> None:
        """Forget the packed copy (and the storage it was made from); the next product packs again."""
        self._state = None

    def _refresh(self, w: Tensor) -> tuple:
        packs = (
            w.device.type == "cpu"
            and not w.is_inference()  # no version counter: an in-place change could not be seen
            and (w.dtype == torch.bfloat16 or (w.dtype == torch.float32 and backend() == "onednn"))
        )
        storage = w.detach()
        blocked = torch.ops.mkldnn._reorder_linear_weight(storage, None) if packs else None
        self._state = state = (w, w.data_ptr(), _version(w), storage, blocked)
        return state

    def product(self, x: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor | None:
        """x (..., K) @ weight.T + bias, then ReLU if asked, on the packed weight; None where it does not apply: a
        tensor off the CPU or empty, autograd recording (for x, the weight or the bias), `torch.compile`, a compute
        dtype (x's, or autocast's where it is on) other than the weight's, or a weight that is not packed."""
        w = getattr(self.owner, self.name)
        if x.device.type != "cpu" or x.numel() == 0 or torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias)):
            return None
        state = self._state
        if state is None or state[0] is not w or state[1] != w.data_ptr() or state[2] != _version(w):
            state = self._refresh(w)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if state[4] is None or dtype != w.dtype:
            return None
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), state[4], bias, "relu" if relu else "none", [None], "")


def _version(t: Tensor) -> int | None:
    """The version counter of t, or None for a tensor made under `torch.inference_mode`, which has none."""
    return None if t.is_inference() else t._version


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose fp32 CPU product may run through oneDNN, and whose weight
    can be packed for inference on CPU (`pack`)."""

    packed: PackedWeight | None = None

    def pack(self) -> None:
        self.packed = PackedWeight(self)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.float()`, `.cuda()`, ...: the packed copy is dropped and made again at the next product on CPU."""
        if self.packed is not None:
            self.packed.drop()
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        return self._product(x, relu=False)

    def relu(self, x: Tensor) -> Tensor:
        """`relu(self(x))`, with the ReLU fused into the product where the weight is packed (oneDNN's ReLU gives 0 for
        a NaN, where `torch.relu` keeps it)."""
        return self._product(x, relu=True)

    def _product(self, x: Tensor, relu: bool) -> Tensor:
        if self.packed is not None and (y := self.packed.product(x, self.bias, relu)) is not None:
            return y
        y = linear(x, self.weight, self.bias)
        return torch.relu(y) if relu else y
