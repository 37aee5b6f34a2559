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
class Translation:
    source: str
    translation: str
    tokens: list[TokenStep]
    total_loss: float
    mean_loss: float
    reference: ReferenceScore | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def total_and_mean(losses: list[float]) -> tuple[float, float]:
    total = float(sum(losses))
    return total, total / max(1, len(losses))
