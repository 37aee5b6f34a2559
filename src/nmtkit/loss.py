"""Label-smoothed cross-entropy fused with the output projection, computed in row chunks.

The plain way materialises logits (N, V), an fp32 copy, log-softmax and its gradient: four
tensors of N x V floats (4,096 tokens x 8,000 pieces = 131 MB each). Here each chunk of rows goes
projection -> logsumexp -> loss and is dropped; backward recomputes the chunk's logits and turns
them straight into gradients. Peak memory falls by hundreds of MB, and the big tensors stay small
enough to be cheap to touch.

The value equals `nn.CrossEntropyLoss(ignore_index, label_smoothing, reduction="sum")` applied to
`hidden @ weight.T` (a test checks value and gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model import Transformer
from .tokenizer import PAD_ID


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore_index: int,
        smoothing: float,
        chunk_rows: int,
        compute_dtype: torch.dtype,
    ) -> Tensor:
        h = hidden.to(compute_dtype)  # (N, D)
        w = weight.to(compute_dtype)  # (V, D)
        is_real = targets != ignore_index
        safe_targets = targets.masked_fill(~is_real, 0)
        lse = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), chunk_rows):
            logits = (h[s : s + chunk_rows] @ w.T).float()  # (n, V)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            nll = chunk_lse - logits.gather(1, safe_targets[s : s + chunk_rows, None])[:, 0]
            smooth = chunk_lse - logits.mean(dim=-1)  # −mean over the vocabulary of log p
            loss = (1.0 - smoothing) * nll + smoothing * smooth
            total += loss.masked_fill(~is_real[s : s + chunk_rows], 0.0).sum()
            lse[s : s + chunk_rows] = chunk_lse
        ctx.save_for_backward(h, w, safe_targets, is_real, lse)
        ctx.smoothing, ctx.chunk_rows = smoothing, chunk_rows
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor) -> tuple:  # type: ignore[override]
        h, w, targets, is_real, lse = ctx.saved_tensors
        eps, rows = ctx.smoothing, ctx.chunk_rows
        V = w.size(0)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for s in range(0, h.size(0), rows):
            logits = (h[s : s + rows] @ w.T).float()  # recomputed: cheaper than keeping (N, V)
            # d loss / d logits = softmax - (1 - eps) * onehot(target) - eps / V, zero at padding
            g = torch.exp(logits - lse[s : s + rows, None]) - eps / V
            g.scatter_add_(1, targets[s : s + rows, None], torch.full_like(g[:, :1], -(1.0 - eps)))
            g = (g * (grad_total * is_real[s : s + rows, None])).to(h.dtype)
            grad_h[s : s + rows] = g @ w
            grad_w += (g.T @ h[s : s + rows]).float()
        hidden_dtype, weight_dtype = ctx.dtypes
        return grad_h.to(hidden_dtype), grad_w.to(weight_dtype), None, None, None, None, None


def projected_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    compute_dtype: torch.dtype = torch.float32,
    chunk_rows: int = 0,
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
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, ignore_index, label_smoothing, chunk_rows, compute_dtype)


class TrainingObjective(nn.Module):
    """The model plus its loss as one module, so that DistributedDataParallel can wrap the whole
    training computation: (src, tgt_in, tgt_out) -> summed label-smoothed cross-entropy.

    compile=True runs the encoder-decoder through `torch.compile` (the fused loss stays eager: its
    chunk loop is already a few large matmuls). Shapes are marked dynamic from the start, since
    every batch has its own (B, S, T); the first steps pay for compilation (a minute or two on CPU,
    where the compiled graph measured slower than eager: docs/performance.md).
    """

    def __init__(self, model: Transformer, label_smoothing: float, compute_dtype: torch.dtype, compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.compute_dtype = compute_dtype
        self._hidden = torch.compile(model.hidden_states, dynamic=True) if compile else model.hidden_states

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
        hidden = self._hidden(src, tgt_in)  # (B, T, D)
        return projected_cross_entropy(
            hidden.flatten(0, 1), self.model.output_weight, tgt_out.flatten(),
            ignore_index=PAD_ID, label_smoothing=self.label_smoothing, compute_dtype=self.compute_dtype,
        )
