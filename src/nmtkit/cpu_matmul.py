"""fp32 matrix products on CPU through oneDNN, on CPUs where it is faster than torch's default BLAS.

torch sends fp32 `F.linear` and `torch.mm` on CPU to MKL, which chooses its kernels by the CPU's vendor: on
AMD CPUs it runs its AVX2 code even where AVX-512 is there, half the multiply-adds per cycle. oneDNN, which torch
ships as well (it runs the bf16 path), chooses by instruction set. On a 2-core AMD EPYC (Zen 5), 2 threads, at the
SMALL model's shapes: MKL 190-214 GFLOP/s, oneDNN 460-480, in the same fp32 arithmetic (no reduced-precision
mode; the results differ from MKL's only by summation order). Where MKL has AVX-512 kernels (Intel CPUs) the two
are close, so nmtkit measures rather than guesses: `backend()` times one product of each once per process and
keeps the faster. NMTKIT_CPU_MATMUL=onednn or =blas chooses without measuring.

`Linear` (the model's projections) and `mm_nt`/`mm_nn`/`mm_tn` (the loss's chunked projection) take the oneDNN
path only for fp32 CPU tensors outside autocast and outside `torch.compile`; everything else is torch's own op.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

CHOICES = ("auto", "onednn", "blas")  # values of NMTKIT_CPU_MATMUL
# oneDNN must be this much faster in the probe to be chosen: where the two are close, timing noise must not flip
# the choice from one process to the next (a resumed run would then sum in another order)
_MARGIN = 1.25
_chosen: str | None = None  # "onednn" or "blas" once decided
_reason = ""


class MatmulChoiceError(ValueError):
    """NMTKIT_CPU_MATMUL holds something other than the CHOICES."""


def _onednn_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


def _lp(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x (M, K) @ w (N, K).T + b through oneDNN; strided x and w are read as they are."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()  # oneDNN builds its kernel on the first call
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def probe(m: int = 1024, k: int = 256, n: int = 1024) -> tuple[float, float]:
    """Seconds for one (m, k) @ (k, n) fp32 product through torch's BLAS and through oneDNN (best of 5)."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    return _best_seconds(lambda: F.linear(x, w)), _best_seconds(lambda: _lp(x, w))


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
            blas, onednn = probe()
            _chosen = "onednn" if blas > _MARGIN * onednn else "blas"
            flops = 2 * 1024 * 256 * 1024 / 1e9
            _reason = f"{_chosen} (measured: BLAS {flops / blas:.0f}, oneDNN {flops / onednn:.0f} GFLOP/s)"
        log.debug("fp32 CPU matmuls: %s", _reason)
    return _chosen


def describe() -> str:
    """The choice and why, for the runtime's log line ('fp32 CPU matmuls -> ...')."""
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
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _lp(x2, weight, bias).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    @once_differentiable  # oneDNN's op has no derivative of its own: a second derivative must fail loudly
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.size(-1))
        needs_x, needs_w, needs_b = ctx.needs_input_grad
        grad_x = _lp(g2, weight.T).view(*grad.shape[:-1], weight.size(1)) if needs_x else None
        grad_w = mm_tn(g2, x2) if needs_w else None
        grad_b = g2.sum(0) if needs_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, through oneDNN for fp32 CPU tensors where `backend()` chose it."""
    if _takes_onednn(x, weight):
        return _OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose fp32 CPU product may run through oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
