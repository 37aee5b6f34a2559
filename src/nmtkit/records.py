"""Typed per-token records: what the model believed at each position, and what it cost.

Probabilities are softmax probabilities, losses are natural-log cross-entropy (−ln p), entropies
are in nats. These names are the `--format jsonl` interface, so keep them stable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Alternative:
    piece: str
    id: int
    prob: float


@dataclass
class TokenStep:
    """One generated token."""

    position: int
    piece: str
    id: int
    prob: float
    loss: float  # −ln prob
    entropy: float  # nats, of the whole next-token distribution
    top_k: list[Alternative] = field(default_factory=list)

    @property
    def entropy_bits(self) -> float:
        return self.entropy / math.log(2)


@dataclass
class ReferenceToken:
    """One reference token, scored with teacher forcing."""

    position: int
    piece: str
    id: int
    prob: float
    loss: float
    greedy_match: bool  # the model's argmax at this position is this token


@dataclass
class ReferenceScore:
    text: str
    tokens: list[ReferenceToken]
    total_loss: float
    mean_loss: float


@dataclass
class Hypothesis:
    """One of the n best outputs of beam search."""

    translation: str
    score: float  # summed ln p of the tokens / length**alpha (see beam.py)
    total_loss: float  # −Σ ln p, EOS included
    tokens: list[TokenStep]


@dataclass
class Translation:
    """A translation and its per-token record; with beam search, of the best hypothesis."""

    source: str
    translation: str
    tokens: list[TokenStep]
    total_loss: float
    mean_loss: float
    reference: ReferenceScore | None = None
    nbest: list[Hypothesis] = field(default_factory=list)  # best first; empty unless more than one was asked for
    # the output reached its length budget (decode.max_len_a/max_len_b, model.max_positions) and its </s> was put there
    # although the model's first choice was another token: the translation is cut short
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.nbest:  # the key only appears when asked for, so greedy records keep their exact keys
            del out["nbest"]
        return out


def total_and_mean(losses: list[float]) -> tuple[float, float]:
    total = float(sum(losses))
    return total, total / max(1, len(losses))
