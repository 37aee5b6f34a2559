"""Label-smoothed cross-entropy fused with the output projection, computed in row chunks.

The plain way materialises logits (N, V), an fp32 copy, log-softmax and its gradient: four
tensors of N x V floats (4,096 tokens x 8,000 pieces = 131 MB each). Here each chunk of rows goes
projection -> logsumexp -> loss, and, while its logits are still in cache, straight on to the
gradients with respect to the hidden states and the weight (the loss is the last op of training, so
backward only scales them by the upstream gradient). No (N, V) tensor is kept or recomputed: peak
memory falls by hundreds of MB and the projection costs three matmuls instead of four.

The value equals `nn.CrossEntropyLoss(ignore_index, label_smoothing, reduction="sum")` applied to
`hidden @ weight.T` (a test checks value and gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import cpu_matmul, native
from .model import DecoderLayer, EncoderLayer, LayerRunner, Transformer, call_layer
from .tokenizer import PAD_ID


class _Ctx(torch.autograd.function.FunctionCtx):
    """The ctx torch passes to forward and backward (a BackwardCFunction) as this Function uses it: FunctionCtx's
    type hints lack the attributes set in C++ and `dtypes`, which forward stores for backward."""

    needs_input_grad: tuple[bool, ...]
    saved_tensors: tuple[Tensor, ...]
    dtypes: tuple[torch.dtype, torch.dtype]


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: _Ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore_index: int,
        smoothing: float,
        chunk_rows: int,
        compute_dtype: torch.dtype,
        fused_chunk: ChunkFn | None,
    ) -> Tensor:
        h = hidden.to(compute_dtype)  # (N, D)
        w = weight.to(compute_dtype)  # (V, D)
        V = w.size(0)
        is_real = targets != ignore_index
        safe_targets = targets.masked_fill(~is_real, 0)
        want_grads = any(ctx.needs_input_grad[:2])
        grad_h: Tensor | None
        grad_w: Tensor | None
        if fused_chunk is not None and want_grads:
            grad_h, grad_w, total = _compiled_chunks(h, w, safe_targets, is_real, smoothing, chunk_rows, fused_chunk)
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (hidden.dtype, weight.dtype)
            return total
        grad_h = torch.empty_like(h) if want_grads else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_grads else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # nmtkit's own kernel for a chunk's loss and gradient where it runs: it turns the chunk's logits into their
        # gradient in place, in the matmul dtype, so a bf16 chunk needs no fp32 copy
        kernel = chunk_kernel(h.device, h.dtype)
        kernel_targets = targets.masked_fill(~is_real, -1) if kernel is not None else None
        # Chunk buffers allocated once per call and reused by every chunk: on CPU a fresh multi-MB tensor
        # per chunk is a fresh mmap whose page faults made the fp32<->bf16 copies cost 1.4 ms each.
        n_max = min(chunk_rows, h.size(0))
        low = torch.empty(n_max, V, dtype=h.dtype, device=h.device) if h.dtype != torch.float32 else None
        # a low-precision chunk's weight gradient and its fp32 copy, before it joins the fp32 sum (fresh ones
        # per chunk cost 0.7 ms a chunk in page faults)
        if low is not None and want_grads:
            assert grad_w is not None  # allocated above whenever want_grads
            chunk_grad_w_low, chunk_grad_w_fp32 = torch.empty_like(w), torch.empty_like(grad_w)
        # fp32 logits: those of fp32 matmuls, or the torch ops' copy of bf16 ones (the kernel reads bf16 as it is)
        fp32 = torch.empty(n_max if low is None or kernel is None else 0, V, dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), chunk_rows):
            rows = slice(s, s + chunk_rows)
            h_rows = h[rows]  # (n, D)
            n = h_rows.size(0)
            if low is None:
                logits = cpu_matmul.mm_nt(h_rows, w, out=fp32[:n])  # (n, V)
            elif kernel is not None:
                logits = torch.mm(h_rows, w.T, out=low[:n])
            else:
                logits = fp32[:n].copy_(torch.mm(h_rows, w.T, out=low[:n]))
            if kernel is not None:
                assert kernel_targets is not None
                total += kernel(logits, kernel_targets[rows], smoothing)
                g = logits  # now d loss / d logits, in the matmul dtype
            else:
                g = _torch_chunk(logits, safe_targets[rows], is_real[rows, None].float(), smoothing, total)
            if want_grads:
                assert grad_h is not None and grad_w is not None  # allocated above whenever want_grads
                if low is None:
                    cpu_matmul.mm_nn_into(grad_h[rows], g, w)
                    cpu_matmul.add_mm_tn_(grad_w, g, h_rows)  # (V, n) @ (n, D), accumulated in place
                else:  # bf16 matmuls; their products summed over chunks in fp32
                    g = g if g.dtype == low.dtype else low[:n].copy_(g)
                    torch.mm(g, w, out=grad_h[rows])
                    grad_w += chunk_grad_w_fp32.copy_(torch.mm(g.T, h_rows, out=chunk_grad_w_low))
        ctx.save_for_backward(grad_h, grad_w)  # type: ignore[arg-type]  # None without want_grads: allowed, not in the type hints
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    @once_differentiable  # the gradients were formed in forward: a second derivative must fail loudly, not vanish
    def backward(ctx: _Ctx, grad_total: Tensor) -> tuple:
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_h * grad_total).to(hidden_dtype), (grad_w * grad_total).to(weight_dtype), None, None, None, None, None, None


def chunk_kernel(device: torch.device, dtype: torch.dtype) -> native.ChunkLoss | None:
    """nmtkit's kernel for the loss's chunks where the eager loop uses it (CPU, fp32 or bf16 matmuls, the kernels
    built), else None: torch's ops (`_torch_chunk`) or, on GPUs with `train.compile`, the compiled chunk."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or (kernels := native.kernels()) is None:
        return None
    return kernels.chunk_loss


def _torch_chunk(logits: Tensor, targets: Tensor, real: Tensor, smoothing: float, total: Tensor) -> Tensor:
    """One chunk's loss (added to `total`) and d loss / d logits, with torch ops, over fp32 logits (n, V), which it
    overwrites. targets (n,) valid ids, real (n, 1) 1.0 at real tokens and 0.0 at padding."""
    V = logits.size(1)
    target_logit = logits.gather(1, targets[:, None])  # (n, 1)
    mean_logit = logits.mean(dim=-1, keepdim=True)  # (n, 1)
    top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    probs = logits.sub_(top).exp_()  # (n, V) unnormalised, in place: logits are not needed again
    sum_exp = probs.sum(dim=-1, keepdim=True)
    lse = top + sum_exp.log()
    # loss = (1 - eps) * (lse - logit[target]) + eps * (lse - mean logit): the smoothed target's cross-entropy
    loss = lse - (1.0 - smoothing) * target_logit - smoothing * mean_logit
    total += (loss * real).sum()
    # d loss / d logits = softmax - (1 - eps) * onehot(target) - eps / V, zero at padding
    g = torch.addcmul(-(smoothing / V) * real, probs, real / sum_exp, out=probs)
    return g.scatter_add_(1, targets[:, None], -(1.0 - smoothing) * real)


ChunkFn = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]


def chunk_loss_and_grad(logits: Tensor, targets: Tensor, real: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
    """One chunk's summed loss and d loss / d logits, as plain tensor expressions for `torch.compile`.

    logits (n, V) in the matmul dtype, targets (n,), real (n,) 1.0 at real tokens and 0.0 at padding. The
    eager loop above runs about ten passes over an fp32 (n, V) tensor; compiled, this is a reduction pass and
    one pass that writes the gradient in the logits' dtype (on a GPU, where the passes are memory-bound).
    """
    x = logits.float()
    V = x.size(1)
    top = x.amax(dim=-1, keepdim=True)
    exp = (x - top).exp()
    sum_exp = exp.sum(dim=-1, keepdim=True)
    lse = top + sum_exp.log()
    is_target = torch.arange(V, device=x.device) == targets[:, None]  # (n, V), never materialised when compiled
    target_logit = torch.where(is_target, x, 0.0).sum(dim=-1, keepdim=True)
    real = real[:, None]
    loss = ((lse - (1.0 - smoothing) * target_logit - smoothing * x.mean(dim=-1, keepdim=True)) * real).sum()
    grad = exp * (real / sum_exp) - (smoothing / V) * real - (1.0 - smoothing) * real * is_target
    return loss, grad.to(logits.dtype)


def _compiled_chunks(
    h: Tensor, w: Tensor, targets: Tensor, is_real: Tensor, smoothing: float, chunk_rows: int, fused_chunk: ChunkFn
) -> tuple[Tensor, Tensor, Tensor]:
    """The chunk loop with `fused_chunk` (the compiled `chunk_loss_and_grad`) between the matmuls."""
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    real = is_real.to(torch.float32)
    for s in range(0, h.size(0), chunk_rows):
        rows = slice(s, s + chunk_rows)
        loss, g = fused_chunk(torch.mm(h[rows], w.T), targets[rows], real[rows], smoothing)
        total += loss
        torch.mm(g, w, out=grad_h[rows])
        grad_w += torch.mm(g.T, h[rows]).float()
    return grad_h, grad_w, total


def projected_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    compute_dtype: torch.dtype = torch.float32,
    chunk_rows: int = 0,
    fused_chunk: ChunkFn | None = None,
) -> Tensor:
    """Summed label-smoothed cross-entropy of `hidden @ weight.T` against `targets`.

    hidden (N, D), weight (V, D), targets (N,) -> scalar (fp32). Matmuls run in `compute_dtype`,
    the softmax and the loss in fp32. chunk_rows 0 picks a size for the device: on CPU about 2M
    logits per chunk, which stay in cache (256 rows at V = 8,000 measured fastest); on GPUs about
    64M, enough to keep the kernels large.
    """
    if chunk_rows <= 0:
        per_chunk = 2**21 if hidden.device.type == "cpu" else 2**26
        chunk_rows = max(16, per_chunk // weight.size(0))
    if not torch.is_grad_enabled():  # no gradients to form (a parameter still reports needs_input_grad)
        hidden, weight = hidden.detach(), weight.detach()
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, ignore_index, label_smoothing, chunk_rows, compute_dtype, fused_chunk)


class TrainingObjective(nn.Module):
    """The model plus its loss as one module, so that DistributedDataParallel can wrap the whole
    training computation: (src, tgt_in, tgt_out) -> summed label-smoothed cross-entropy.

    compile=True runs every encoder and decoder layer through `torch.compile`, and on GPUs also each loss
    chunk's softmax and gradient (`chunk_loss_and_grad`: two memory passes instead of about ten; on CPU the
    eager chunk loop keeps its cache-sized chunks). One compiled forward per layer class serves all its
    layers, so compilation costs two layers' worth, not the whole stack's (a whole-model graph took over
    200 s to compile on an H200). Shapes are marked dynamic from the start, since every batch has its own
    (B, S, T). The model itself is not changed: its own forward stays eager (decoding, copies).
    """

    def __init__(self, model: Transformer, label_smoothing: float, compute_dtype: torch.dtype, compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.compute_dtype = compute_dtype
        self._run_layer: LayerRunner = call_layer
        self._fused_chunk = None
        if compile:
            compiled = {cls: torch.compile(cls.forward, dynamic=True) for cls in (EncoderLayer, DecoderLayer)}
            self._run_layer = lambda layer, *inputs: compiled[type(layer)](layer, *inputs)
            self._fused_chunk = torch.compile(chunk_loss_and_grad, dynamic=True)

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
        hidden = self.model.hidden_states(src, tgt_in, self._run_layer)  # (B, T, D)
        return projected_cross_entropy(
            hidden.flatten(0, 1), self.model.output_weight, tgt_out.flatten(),
            ignore_index=PAD_ID, label_smoothing=self.label_smoothing, compute_dtype=self.compute_dtype,
            fused_chunk=self._fused_chunk if hidden.device.type != "cpu" else None,
        )
