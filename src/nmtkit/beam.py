"""Beam search with a KV cache, batched over sentences, recording the same per-token statistics as greedy.

B sentences x K beams run as one batch of B*K decoder rows (row b*K + k is beam k of sentence b).
The cross-attention keys and values are computed once per sentence and copied to its K rows; after each
step `KVCache.reorder` makes every row follow the beam it now extends, and the per-token history (ids,
probabilities, entropies, top-k alternatives) is gathered by the same beam index.

Search, as in fairseq: each step takes the 2K best extensions of the K live beams by summed log-probability
(live beams all have the same length, so that is also the order of their scores). Those among the first K that
end in EOS are finished and compete by score for the sentence's K finished slots; the best K that don't end in
EOS stay live. A sentence stops once it has K finished hypotheses, or at its length budget, where each live
beam is ended with EOS (at EOS's own probability, as greedy does). With K = 1 this is exactly greedy decoding.

Score: summed natural-log probability of the tokens (EOS included) divided by length**alpha, the simple
length penalty (fairseq's `lenpen`), not GNMT's ((5 + len) / 6)**alpha. alpha = 1 (the default) ranks by mean
log-probability per token, alpha = 0 by the raw sum, which favours short outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from .decode import GreedyOutput
from .model import Transformer, padding_mask
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass
class BeamOutput:
    """The n-best hypotheses of each sentence, best first. L is the longest hypothesis kept."""

    tokens: Tensor  # (B, N, L) ids; EOS included, PAD after it
    lengths: Tensor  # (B, N) tokens up to and including EOS
    scores: Tensor  # (B, N) log_probs / lengths**alpha; -inf marks a slot no hypothesis reached
    log_probs: Tensor  # (B, N) summed ln p of the tokens
    probs: Tensor  # (B, N, L) softmax probability of each token
    entropy: Tensor  # (B, N, L) nats, of the whole next-token distribution
    top_ids: Tensor  # (B, N, L, k)
    top_probs: Tensor  # (B, N, L, k)
    losses: Tensor  # (B, N, L) −ln p of each token, from its log-probability

    def rank(self, n: int) -> GreedyOutput:
        """The n-th best hypothesis of every sentence, in greedy's layout (B, L), so one converter reads both."""
        return GreedyOutput(
            self.tokens[:, n], self.lengths[:, n], self.probs[:, n], self.entropy[:, n], self.top_ids[:, n], self.top_probs[:, n],
            self.losses[:, n],
        )


def length_penalty(length: Tensor | int, alpha: float) -> Tensor | float:
    """The divisor of a hypothesis's summed log-probability: length**alpha (length counts EOS)."""
    return length**alpha


def _gather_beams(x: Tensor, index: Tensor) -> Tensor:
    """x (B, K, ...), index (B, K') -> (B, K', ...): row index[b, j] of sentence b at position j."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


@dataclass
class _Step:
    """What one step chose for each of K' candidates, and what the model believed there."""

    tokens: Tensor  # (B, K')
    probs: Tensor  # (B, K')
    entropy: Tensor  # (B, K')
    top_ids: Tensor  # (B, K', k)
    top_probs: Tensor  # (B, K', k)
    losses: Tensor  # (B, K') −ln p

    def select(self, index: Tensor) -> _Step:
        """index (B, K'') -> the candidates at those positions."""
        return _Step(**{f.name: _gather_beams(getattr(self, f.name), index) for f in fields(self)})


@dataclass
class _Trace:
    """The per-token history of K hypotheses per sentence; same fields as `_Step`, with a length axis L."""

    tokens: Tensor  # (B, K, L) PAD where nothing was written yet
    probs: Tensor  # (B, K, L)
    entropy: Tensor  # (B, K, L)
    top_ids: Tensor  # (B, K, L, k)
    top_probs: Tensor  # (B, K, L, k)
    losses: Tensor  # (B, K, L)

    @classmethod
    def empty(cls, B: int, K: int, L: int, k: int, device: torch.device) -> _Trace:
        zeros = torch.zeros(B, K, L, device=device)
        return cls(
            torch.full((B, K, L), PAD_ID, dtype=torch.long, device=device),
            zeros,
            zeros.clone(),
            torch.zeros(B, K, L, k, dtype=torch.long, device=device),
            torch.zeros(B, K, L, k, device=device),
            zeros.clone(),
        )

    def select(self, index: Tensor) -> _Trace:
        """index (B, K') of parent rows -> their histories (B, K', L, ...), copied."""
        return _Trace(**{f.name: _gather_beams(getattr(self, f.name), index) for f in fields(self)})

    def write(self, t: int, step: _Step) -> None:
        """Record `step` (K rows per sentence, the same K as this trace) at position t."""
        for f in fields(self):
            getattr(self, f.name)[:, :, t] = getattr(step, f.name)

    def cat(self, other: _Trace) -> _Trace:
        return _Trace(**{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)], dim=1) for f in fields(self)})


@dataclass
class _Candidates:
    """The 2K best extensions of each sentence's live beams, best first."""

    sums: Tensor  # (B, 2K) summed log-probability of the extended hypothesis
    beams: Tensor  # (B, 2K) the live beam each extends
    step: _Step  # the token each adds, with its statistics


def _expand(logp: Tensor, sums: Tensor, is_last: Tensor, top_k: int) -> _Candidates:
    """logp (B, K, V) next-token log-probabilities of the live beams, sums (B, K) their summed log-probabilities,
    is_last (B,) sentences at their length budget -> the 2K best extensions."""
    B, K, V = logp.shape
    p = logp.exp()
    entropy = -(p * logp).sum(dim=-1)  # (B, K)
    top_probs, top_ids = p.topk(top_k, dim=-1)  # (B, K, k)
    # At the budget EOS is the only continuation, still scored with its own probability.
    is_not_eos = torch.arange(V, device=logp.device) != EOS_ID
    allowed = logp.masked_fill(is_last[:, None, None] & is_not_eos, float("-inf"))
    best, flat = (sums[..., None] + allowed).view(B, K * V).topk(2 * K, dim=1)  # (B, 2K) into the K*V grid
    beams, tokens = flat // V, flat % V
    token_logp = logp.view(B, K * V).gather(1, flat)
    step = _Step(
        tokens, token_logp.exp(), _gather_beams(entropy, beams), _gather_beams(top_ids, beams), _gather_beams(top_probs, beams),
        token_logp.neg(),
    )
    return _Candidates(best, beams, step)


def _live_positions(tokens: Tensor, K: int) -> Tensor:
    """tokens (B, 2K) candidate ids -> (B, K) positions of the K best that don't end in EOS.

    Each live beam has one EOS extension, so at most K of the 2K candidates are EOS and K others always remain.
    """
    rank = torch.arange(tokens.size(1), device=tokens.device)
    key = rank + (tokens == EOS_ID) * tokens.size(1)  # EOS candidates sort after every other one
    return key.argsort(dim=1)[:, :K]


@dataclass
class _Finished:
    """Each sentence's K best finished hypotheses, best first."""

    trace: _Trace  # (B, K, L, ...)
    scores: Tensor  # (B, K) normalised; -inf for an empty slot
    log_probs: Tensor  # (B, K)
    lengths: Tensor  # (B, K)

    @classmethod
    def empty(cls, B: int, K: int, L: int, k: int, device: torch.device) -> _Finished:
        scores = torch.full((B, K), float("-inf"), device=device)
        return cls(
            _Trace.empty(B, K, L, k, device), scores, torch.zeros_like(scores), torch.ones(B, K, dtype=torch.long, device=device)
        )

    def add(self, t: int, live: _Trace, cand: _Candidates, is_open: Tensor, alpha: float) -> None:
        """Move the EOS candidates among the first K (of sentences still open) into the slots if they score better."""
        K = live.tokens.size(1)
        first = torch.arange(K, device=cand.sums.device).expand(cand.sums.size(0), K)
        new = live.select(cand.beams[:, :K])  # (B, K, L) the parents' histories, copied
        new.write(t, cand.step.select(first))
        # Fairseq's rule: an EOS ranked below K could not have entered the beam, so it does not finish.
        is_new = (cand.step.tokens[:, :K] == EOS_ID) & is_open[:, None]
        new_scores = torch.where(is_new, cand.sums[:, :K] / length_penalty(t + 1, alpha), float("-inf"))
        scores, keep = torch.cat([self.scores, new_scores], dim=1).topk(K, dim=1)  # (B, K) of 2K
        self.trace = self.trace.cat(new).select(keep)
        self.log_probs = torch.cat([self.log_probs, cand.sums[:, :K]], dim=1).gather(1, keep)
        self.lengths = torch.cat([self.lengths, torch.full_like(self.lengths, t + 1)], dim=1).gather(1, keep)
        self.scores = scores

    def best(self, n: int) -> BeamOutput:
        lengths = self.lengths[:, :n]
        L = max(1, int(lengths.max()))
        tr = self.trace
        return BeamOutput(
            tr.tokens[:, :n, :L], lengths, self.scores[:, :n], self.log_probs[:, :n],
            tr.probs[:, :n, :L], tr.entropy[:, :n, :L], tr.top_ids[:, :n, :L], tr.top_probs[:, :n, :L], tr.losses[:, :n, :L],
        )  # fmt: skip


def check_beam_settings(beam_size: int, nbest: int, vocab_size: int | None = None) -> None:
    """Raise ValueError, naming the values, for settings beam search can't run with (the vocabulary's limit only when
    its size is given: without a model loaded yet, the rest)."""
    if beam_size < 1:
        raise ValueError(f"beam size must be at least 1, got {beam_size}")
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest must be between 1 and the beam size ({beam_size}), got {nbest}")
    if vocab_size is not None and 2 * beam_size > vocab_size:  # each step takes 2K candidates
        raise ValueError(
            f"beam size {beam_size} needs a target vocabulary of at least {2 * beam_size}, this one has {vocab_size}"
        )


@torch.no_grad()
def beam_search(
    model: Transformer, src: Tensor, max_len: Tensor | int, *, beam_size: int, nbest: int = 1, top_k: int = 0, alpha: float = 1.0
) -> BeamOutput:
    """Beam search of src (B, S) -> the `nbest` best hypotheses per sentence.

    max_len: per-sentence output budget (B,) or one int; a hypothesis that reaches it ends with EOS.
    top_k: alternatives recorded per token (0 records none). alpha: the length penalty exponent (module docstring).
    """
    check_beam_settings(beam_size, nbest, model.tgt_vocab_size)
    B, K, V, device = src.size(0), beam_size, model.tgt_vocab_size, src.device
    limits = torch.as_tensor(max_len, device=device).expand(B)
    n_steps = int(limits.max())
    src_mask = padding_mask(src)
    cache = model.start_cache(model.encode(src, src_mask), src_mask, n_steps)
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) the sentence of each decoder row
    cache.reorder(rows)  # memory keys/values computed once per sentence, then copied to its K beams
    offsets = torch.arange(B, device=device)[:, None] * K  # (B, 1) first row of each sentence

    # Only beam 0 starts live, so the first step doesn't pick the same token K times.
    sums = torch.full((B, K), float("-inf"), device=device)
    sums[:, 0] = 0.0
    live = _Trace.empty(B, K, n_steps, top_k, device)
    finished = _Finished.empty(B, K, n_steps, top_k, device)
    is_done = torch.zeros(B, dtype=torch.bool, device=device)
    token = torch.full((B * K, 1), BOS_ID, dtype=torch.long, device=device)

    for t in range(n_steps):
        logits = model.project(model.decode_step(token, cache))  # (B*K, V)
        logp = F.log_softmax(logits.float(), dim=-1).view(B, K, V)
        is_last = t + 1 >= limits
        cand = _expand(logp, sums, is_last, top_k)
        finished.add(t, live, cand, ~is_done, alpha)
        keep = _live_positions(cand.step.tokens, K)  # (B, K) positions among the 2K
        parents = cand.beams.gather(1, keep)
        sums = cand.sums.gather(1, keep)
        live = live.select(parents)
        live.write(t, cand.step.select(keep))
        cache.reorder((parents + offsets).flatten(), memory=False)  # rows move among a sentence's beams only
        token = live.tokens[:, :, t].reshape(B * K, 1)
        is_done |= (torch.isfinite(finished.scores).sum(dim=1) >= K) | is_last
        # The host check costs a sync, so look every 4 steps; steps after a sentence is done don't touch its slots.
        if t % 4 == 3 and bool(is_done.all()):
            break
    return finished.best(nbest)
