"""Greedy decoding with a KV cache, and teacher-forced scoring of a reference.

Both return tensors; `translator.py` turns them into per-token records. Statistics are gathered on
the device into preallocated buffers, so the loop never waits on the host except for the cheap
"all finished?" check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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


def max_new_tokens(src: Tensor, a: float, b: int, limit: int) -> Tensor:
    """(B, S) source -> (B,) output budget a * len + b, capped by the model's positions."""
    src_len = (src != PAD_ID).sum(dim=1)
    return (src_len.float() * a + b).long().clamp(min=1, max=limit)


def token_stats(
    logits: Tensor, chosen: Tensor, top_logits: Tensor, top_ids: Tensor, work: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """logits (B, V), chosen ids (B,), the k largest logits and their ids (B, k) -> probability of the
    chosen token, entropy (nats) and the top-k probabilities, all in fp32.

    Written to touch the (B, V) logits as few times as possible (this runs at every decoding step): one
    fused softmax p, then ln Z = m - ln p(argmax) with m the largest logit, and the entropy -sum p ln p =
    ln Z - p . x (p times x in p's own buffer, once the probabilities are gathered, then a sum per row: no (B, V)
    tensor besides p). `work` is (B, V) fp32 scratch for p that the caller allocates once: on CPU a fresh 2 MB
    tensor at every step can be a fresh mmap, whose page faults cost up to a millisecond. With work=None, p is a
    fresh tensor. The top-k come from the caller, who needs them first.
    """
    # fp32 throughout: under bf16 autocast the dot product would round p and x to bf16 (two copies of the logits)
    with torch.autocast(logits.device.type, enabled=False):
        x = logits.float()
        p = torch.softmax(x, dim=-1, out=torch.empty_like(x) if work is None else work)  # (B, V)
        lse = top_logits[:, 0].float() - p.gather(1, top_ids[:, :1])[:, 0].log()  # (B,) ln Z; p(argmax) >= 1/V
        p_chosen, p_top = p.gather(1, chosen[:, None])[:, 0], p.gather(1, top_ids)
        entropy = lse - p.mul_(x).sum(dim=-1)  # p . x in p's own buffer (vecdot writes a (B, V) product of its own)
        return p_chosen, entropy, p_top


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
        entropy = torch.zeros(B, n_steps, device=src.device)
        top_ids = torch.zeros(B, n_steps, top_k, dtype=torch.long, device=src.device)
        top_probs = torch.zeros(B, n_steps, top_k, device=src.device)
    token = torch.full((B, 1), BOS_ID, dtype=torch.long, device=src.device)
    # The (B, V) logits are the largest tensors of a step: written into buffers allocated once, and
    # copied to fp32 for the argmax (bf16 argmax has no fast CPU kernel: 0.87 ms vs 0.18 ms per step).
    weight_t = model.output_weight.t()  # (D, V)
    logits_lp = torch.empty(B, weight_t.size(1), dtype=weight_t.dtype, device=src.device)
    logits32 = None if logits_lp.dtype == torch.float32 else torch.empty_like(logits_lp, dtype=torch.float32)
    work = torch.empty(logits_lp.shape, device=src.device) if record else None  # token_stats' scratch
    graph = capture_step(model, token, cache, weight_t, logits_lp) if static and src.device.type == "cuda" else None

    for t in range(n_steps):
        if graph is not None:
            graph.replay()  # reads `token`, writes logits_lp
            step_logits = logits_lp
        else:  # into logits_lp, or a fresh tensor from packed weights (CPU)
            step_logits = model.project_into(model.decode_step(token, cache), logits_lp)
        logits = step_logits if logits32 is None else logits32.copy_(step_logits)
        if record:  # the top-k's first column is the argmax, so the log costs no argmax of its own
            top_logits, top_ids[:, t] = block_topk(logits, top_k)
            nxt = top_ids[:, t, 0]  # a view; column t is never written again
        else:
            nxt = block_argmax(logits)
        if stop_at_eos:
            nxt = torch.where(t + 1 >= limits, EOS_ID, nxt)  # the budget ends a sentence with EOS
            nxt = nxt.masked_fill(is_done, PAD_ID)
            is_done |= nxt == EOS_ID
        if record:  # after the budget rule, so a forced EOS is recorded with EOS's own probability
            probs[:, t], entropy[:, t], top_probs[:, t] = token_stats(logits, nxt, top_logits, top_ids[:, t], work)
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
    return GreedyOutput(out, lengths, probs[:, :n], entropy[:, :n], top_ids[:, :n], top_probs[:, :n])


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
