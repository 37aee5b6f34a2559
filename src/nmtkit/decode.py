"""Greedy decoding with a KV cache, and teacher-forced scoring of a reference.

Both return tensors; `translator.py` turns them into per-token records. Statistics are gathered on
the device into preallocated buffers, so the loop never waits on the host except for the cheap
"all finished?" check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .kv_cache import KVCache
from .model import Transformer, padding_mask
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass
class GreedyOutput:
    tokens: Tensor  # (B, N) generated ids; EOS included, PAD after it
    lengths: Tensor  # (B,) tokens up to and including EOS (or N when EOS never came)
    probs: Tensor | None = None  # (B, N) softmax probability of each chosen token
    entropy: Tensor | None = None  # (B, N) nats
    top_ids: Tensor | None = None  # (B, N, k)
    top_probs: Tensor | None = None  # (B, N, k)
    losses: Tensor | None = None  # (B, N) −ln p of each chosen token, from its log-probability (exact where p underflows)


def max_new_tokens(src: Tensor, a: float, b: int, limit: int) -> Tensor:
    """(B, S) source -> (B,) output budget a * len + b, capped by the model's positions."""
    src_len = (src != PAD_ID).sum(dim=1)
    return (src_len.float() * a + b).long().clamp(min=1, max=limit)


class TorchStepStats:
    """`native.DecodeStats`' contract in torch ops: for CUDA, and for CPUs where nmtkit's kernel can't be built.

    (logits (B, V), values (B, k), ids (B, k), log_z (B,) | None, entropy (B,) | None) -> None, writing the k largest
    logits and their ids, and with log_z and entropy given, ln Z (the log-sum-exp) and the entropy of the softmax in nats,
    all in fp32. Without them and with k = 1 only the argmax is written (ids); the values are left alone.

    Written to touch the (B, V) logits as few times as torch allows (this runs at every decoding step): low-precision
    logits copied to fp32 once (torch's bf16 argmax and top-k are slow on CPU: 0.87 ms vs 0.18 ms per step), a block top-k,
    then one fused softmax p, ln Z = m - ln p(argmax) with m the largest logit, and the entropy -sum p ln p = ln Z - p . x
    (p times x in p's own buffer, then a sum per row). Both (B, V) buffers are allocated once per decoding run: on CPU a
    fresh 2 MB tensor at every step can be a fresh mmap, whose page faults cost up to a millisecond.
    """

    def __init__(self) -> None:
        self._fp32: Tensor | None = None  # fp32 copy of low-precision logits
        self._p: Tensor | None = None  # softmax

    def __call__(self, logits: Tensor, values: Tensor, ids: Tensor, log_z: Tensor | None = None, entropy: Tensor | None = None) -> None:
        # fp32 throughout: under bf16 autocast the dot product would round p and x to bf16 (two copies of the logits)
        with torch.autocast(logits.device.type, enabled=False):
            x = logits if logits.dtype == torch.float32 else self._buffer("_fp32", logits).copy_(logits)
            if log_z is None and values.size(1) == 1:
                ids[:, 0] = block_argmax(x)
                return
            top_values, top_ids = self._top_k(x, values.size(1))
            values.copy_(top_values)
            ids.copy_(top_ids)
            if log_z is None or entropy is None:
                return
            p = torch.softmax(x, dim=-1, out=self._buffer("_p", x))  # (B, V)
            torch.sub(top_values[:, 0], p.gather(1, top_ids[:, :1])[:, 0].log(), out=log_z)  # p(argmax) >= 1/V
            # p . x in p's own buffer; nansum: a -inf logit has p = 0, and 0 * -inf is NaN where it contributes nothing
            torch.sub(log_z, p.mul_(x).nansum(dim=-1), out=entropy)

    @staticmethod
    def _top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """block_topk with ties in id order, led by block_argmax's token (see `lower_id_first`)."""
        if k == 1:
            ids = block_argmax(x)[:, None]
            return x.gather(1, ids), ids
        values, ids = block_topk(x, k)
        # Only where all k places hold the maximum can the argmax lie outside them: on CPU look first (a host read is
        # free there, and the argmax is another pass over the logits); on GPUs always, rather than wait on the device.
        outside = x.device.type != "cpu" or bool((values[:, -1] == values[:, 0]).any())
        return lower_id_first(values, ids, block_argmax(x) if outside else None)

    def _buffer(self, name: str, like: Tensor) -> Tensor:
        """The fp32 buffer self.<name>, (re)allocated when `like`'s shape is new."""
        buffer = getattr(self, name)
        if buffer is None or buffer.shape != like.shape:
            buffer = torch.empty(like.shape, dtype=torch.float32, device=like.device)
            setattr(self, name, buffer)
        return buffer


def lower_id_first(values: Tensor, ids: Tensor, argmax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A top-k's (B, k) values and ids with tied values in id order, led by `argmax` (B,) when given, the first of the
    largest logits: the token chosen with the log off, and by nmtkit's kernel.

    torch's topk leaves the order of ties free, and bf16 logits tie often (8 bits of mantissa: 25 of the 807 test
    sentences of the quick start met a tie at the top), so the chosen token could depend on whether the log was on.
    With more than k logits tied at the top, the top-k may not hold the argmax; it then takes the last place (whose
    value is the same), and sorting by id brings it first.
    """
    if argmax is not None:
        held = (ids == argmax[:, None]).any(dim=1, keepdim=True)
        ids = torch.where(held, ids, torch.cat([argmax[:, None], ids[:, :-1]], dim=1))
    ids, order = ids.sort(dim=-1)
    values, order = values.gather(1, order).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, order)


def step_stats(logits: Tensor) -> Callable[..., None]:
    """The per-step top-k and statistics for logits like these: nmtkit's kernel on CPU where it builds, else torch ops."""
    kernels = native.kernels() if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) else None
    if kernels is None:
        return TorchStepStats()
    scratch = torch.empty(logits.size(-1)) if logits.dtype == torch.bfloat16 else None  # one row, widened to fp32
    return functools.partial(kernels.decode_stats, scratch=scratch)


_BLOCK = 64  # vocabulary block for `block_topk`


def block_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`logits.topk(k, dim=-1)` for (B, V) logits, exact, in a third to a half of the time on CPU.

    torch's index-returning reductions (argmax, topk) are not vectorised on CPU (argmax over 64 x 8,000
    floats: 154 us; amax: 13 us). So: the largest value of each block of 64, the k best blocks (the k
    largest values lie in at most k blocks, and those have the k largest block maxima), then top-k over
    those k * 64 candidates. Falls back to `topk` when V is not a multiple of the block.
    """
    B, V = logits.shape
    if V % _BLOCK or V < k * _BLOCK:
        return logits.topk(k, dim=-1)
    blocks = logits.view(B, V // _BLOCK, _BLOCK)
    best_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # (B, k)
    candidates = blocks.gather(1, best_blocks[..., None].expand(B, k, _BLOCK)).view(B, k * _BLOCK)
    values, pos = candidates.topk(k, dim=-1)  # (B, k)
    return values, best_blocks.gather(1, pos // _BLOCK) * _BLOCK + pos % _BLOCK


def block_argmax(logits: Tensor) -> Tensor:
    """`logits.argmax(dim=-1)` for (B, V) logits, the same way as `block_topk` (first index on ties)."""
    B, V = logits.shape
    if V % _BLOCK:
        return logits.argmax(dim=-1)
    blocks = logits.view(B, V // _BLOCK, _BLOCK)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)  # (B,) the first block holding the maximum
    rows = blocks[torch.arange(B, device=logits.device), best_block]  # (B, 64)
    return best_block * _BLOCK + rows.argmax(dim=-1)


def capture_step(model: Transformer, token: Tensor, cache: KVCache, weight_t: Tensor, logits: Tensor) -> torch.cuda.CUDAGraph:
    """One decoding step (decoder layers and output projection into `logits`) captured as a CUDA graph.

    Eager, a step is ~200 kernel launches of a few microseconds of work each, issued one Python call at a
    time, so the GPU mostly waits; a replay launches them all at once. Needs a static cache (fixed shapes,
    the position on the device); `token` (B, 1) is read, `logits` (B, V) written, at every replay.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # one eager step first: cuBLAS sets up its workspaces outside the capture
        model.decode_step(token, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # autocast's weight-cast cache must be off while capturing (the weights are in the compute dtype anyway)
    autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
    with autocast, torch.cuda.graph(graph):
        hidden = model.decode_step(token, cache)
        torch.mm(hidden.to(weight_t.dtype), weight_t, out=logits)
    cache.position.zero_()  # the eager step advanced it; the capture itself ran nothing
    return graph


@torch.no_grad()
def greedy_decode(
    model: Transformer, src: Tensor, max_len: Tensor | int, *, top_k: int = 0, stop_at_eos: bool = True, static: bool = False
) -> GreedyOutput:
    """Greedy decoding of src (B, S).

    max_len: per-sentence output budget (B,) or one int; a sentence that reaches its budget without
    EOS ends there. top_k > 0 records probabilities, entropy and the top-k alternatives per step.
    stop_at_eos=False always runs the full budget (benchmarks need a fixed amount of work).
    static=True decodes with fixed-shape steps (a static KV cache), which on CUDA are captured once as a
    CUDA graph and replayed (`decode.cuda_graphs`); the tokens are the same up to rounding (a static step's
    attention reduces over all slots, so bf16 near-ties can go the other way). Each capture costs about one
    eager step plus the graph's set-up, and `torch.cuda.graph` empties the allocator's cache before it.
    """
    B = src.size(0)
    limits = torch.as_tensor(max_len, device=src.device).expand(B)
    n_steps = int(limits.max())
    src_mask = padding_mask(src)
    memory = model.encode(src, src_mask)
    cache = model.start_cache(memory, src_mask, n_steps, static=static)

    out = torch.full((B, n_steps), PAD_ID, dtype=torch.long, device=src.device)
    is_done = torch.zeros(B, dtype=torch.bool, device=src.device)
    record = top_k > 0
    if record:
        probs = torch.zeros(B, n_steps, device=src.device)
        losses = torch.zeros(B, n_steps, device=src.device)
        entropy = torch.zeros(B, n_steps, device=src.device)
        top_ids = torch.zeros(B, n_steps, top_k, dtype=torch.long, device=src.device)
        top_probs = torch.zeros(B, n_steps, top_k, device=src.device)
    token = torch.full((B, 1), BOS_ID, dtype=torch.long, device=src.device)
    # The (B, V) logits are the largest tensors of a step: written into a buffer allocated once (CUDA), and read by
    # `stats` for the argmax (or the top-k) and, with the log, ln Z and the entropy, into these small buffers.
    weight_t = model.output_weight.t()  # (D, V)
    logits_lp = torch.empty(B, weight_t.size(1), dtype=weight_t.dtype, device=src.device)
    stats = step_stats(logits_lp)
    best = torch.empty(B, max(top_k, 1), device=src.device)  # (B, k) largest logits, fp32
    best_ids = torch.empty(B, max(top_k, 1), dtype=torch.long, device=src.device)
    log_z, step_entropy = torch.empty(B, device=src.device), torch.empty(B, device=src.device)  # written only with the log
    graph = capture_step(model, token, cache, weight_t, logits_lp) if static and src.device.type == "cuda" else None

    for t in range(n_steps):
        if graph is not None:
            graph.replay()  # reads `token`, writes logits_lp
            step_logits = logits_lp
        else:  # into logits_lp, or a fresh tensor from packed weights (CPU)
            step_logits = model.project_into(model.decode_step(token, cache), logits_lp)
        stats(step_logits, best, best_ids, *((log_z, step_entropy) if record else ()))  # column 0: the argmax
        nxt = best_ids[:, 0]
        if stop_at_eos:
            nxt = torch.where(t + 1 >= limits, EOS_ID, nxt)  # the budget ends a sentence with EOS
            nxt = nxt.masked_fill(is_done, PAD_ID)
            is_done |= nxt == EOS_ID
        if record:  # after the budget rule, so a forced EOS is recorded with EOS's own probability
            chosen = step_logits.gather(1, nxt[:, None])[:, 0].float()
            torch.sub(log_z, chosen, out=losses[:, t])  # −ln p: finite where p underflows (a forced EOS, say)
            torch.neg(losses[:, t], out=probs[:, t]).exp_()  # into its slot: no allocation in the step
            torch.exp(best - log_z[:, None], out=top_probs[:, t])
            entropy[:, t] = step_entropy
            top_ids[:, t] = best_ids
        out[:, t] = nxt
        token.copy_(nxt[:, None])  # in place: a captured step reads this buffer
        # The host check costs a sync, so look every 4 steps; extra steps only write PAD.
        if stop_at_eos and t % 4 == 3 and bool(is_done.all()):
            out = out[:, : t + 1]
            break

    n = out.size(1)
    is_eos = out == EOS_ID
    lengths = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1) + 1, torch.full_like(limits, n))
    if not record:
        return GreedyOutput(out, lengths)
    return GreedyOutput(out, lengths, probs[:, :n], entropy[:, :n], top_ids[:, :n], top_probs[:, :n], losses[:, :n])


@dataclass
class ReferenceScores:
    probs: Tensor  # (B, T) probability of each reference token
    losses: Tensor  # (B, T) −ln prob, 0 at padding
    is_greedy: Tensor  # (B, T) bool, the argmax equals the reference token
    mask: Tensor  # (B, T) bool, real (non-pad) reference tokens
    logits: Tensor  # (B, T, V) the raw logits, for callers that want more


@torch.no_grad()
def score_reference(model: Transformer, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> ReferenceScores:
    """Teacher forcing: the model reads BOS + reference and is scored on reference + EOS."""
    logits = model(src, tgt_in).float()  # (B, T, V)
    logp = F.log_softmax(logits, dim=-1)
    target_logp = logp.gather(-1, tgt_out[..., None])[..., 0]  # (B, T)
    mask = tgt_out != PAD_ID
    losses = (-target_logp).masked_fill(~mask, 0.0)
    is_greedy = logits.argmax(dim=-1) == tgt_out
    return ReferenceScores(target_logp.exp(), losses, is_greedy & mask, mask, logits)
