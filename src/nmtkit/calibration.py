"""Calibration of next-token predictions under teacher forcing: does a top-1 probability of 0.8 come true 80% of the time?

For every non-pad target position the model's confidence is its top-1 probability, and it is correct when that
argmax is the reference token. Positions go into 15 equal-width confidence bins over [0, 1]; bin i holds
[i/15, (i+1)/15), the last one also 1.0. The expected calibration error (Guo et al., 2017) is the gap between
accuracy and mean confidence per bin, weighted by the bin's share of positions:

    ECE = sum_b (n_b / N) * |accuracy_b - confidence_b| = sum_b |correct_b - confidence_sum_b| / N

so only per-bin sums are needed. They are kept on the device, in float64, and a batch adds to them with
`index_add_` (no host sync, no per-token Python); `result()` reads them once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .tokenizer import PAD_ID

N_BINS = 15


@dataclass
class CalibrationBin:
    lower: float
    upper: float
    count: int  # target positions whose confidence falls in [lower, upper)
    mean_confidence: float  # mean top-1 probability; 0 for an empty bin
    accuracy: float  # share whose argmax is the reference token; 0 for an empty bin


@dataclass
class Calibration:
    ece: float  # expected calibration error, in [0, 1]
    mean_entropy: float  # nats, of the whole next-token distribution, averaged over positions
    tokens: int  # non-pad target positions counted
    bins: list[CalibrationBin]


class CalibrationAccumulator:
    """Per-bin sums of count, confidence and correctness, plus the entropy sum, over any number of batches."""

    def __init__(self, n_bins: int = N_BINS, device: torch.device | str = "cpu") -> None:
        self.n_bins = n_bins
        self.counts = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.confidence_sums = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.correct_sums = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.entropy_sum = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add_logits(self, logits: Tensor, targets: Tensor) -> None:
        """logits (N, V) and reference ids (N,), both flattened over batch and time; PAD targets are skipped."""
        logp = F.log_softmax(logits.float(), dim=-1)
        top_logp, top_ids = logp.max(dim=-1)  # (N,)
        entropy = -(logp.exp() * logp).sum(dim=-1)  # (N,)
        self.add(top_logp.exp(), top_ids == targets, entropy, weight=targets != PAD_ID)

    @torch.no_grad()
    def add(self, confidence: Tensor, is_correct: Tensor, entropy: Tensor, weight: Tensor | None = None) -> None:
        """Add positions: confidence (N,) in [0, 1], is_correct (N,) bool, entropy (N,) nats.

        weight (N,) bool or 0/1 leaves positions out without boolean indexing, which would sync with the host.
        """
        w = torch.ones_like(confidence, dtype=torch.float64) if weight is None else weight.to(torch.float64)
        conf = confidence.to(torch.float64)
        index = (conf * self.n_bins).long().clamp(0, self.n_bins - 1)  # 1.0 joins the last bin
        self.counts.index_add_(0, index, w)
        self.confidence_sums.index_add_(0, index, conf * w)
        self.correct_sums.index_add_(0, index, is_correct.to(torch.float64) * w)
        self.entropy_sum += (entropy.to(torch.float64) * w).sum()

    def result(self) -> Calibration:
        counts, conf, correct = self.counts.tolist(), self.confidence_sums.tolist(), self.correct_sums.tolist()
        total = sum(counts)
        bins = [
            CalibrationBin(
                lower=i / self.n_bins,
                upper=(i + 1) / self.n_bins,
                count=round(counts[i]),
                mean_confidence=conf[i] / counts[i] if counts[i] else 0.0,
                accuracy=correct[i] / counts[i] if counts[i] else 0.0,
            )
            for i in range(self.n_bins)
        ]
        ece = sum(abs(correct[i] - conf[i]) for i in range(self.n_bins)) / max(total, 1.0)
        return Calibration(ece, self.entropy_sum.item() / max(total, 1.0), round(total), bins)


def calibration_of(confidence: Tensor, is_correct: Tensor, entropy: Tensor | None = None, n_bins: int = N_BINS) -> Calibration:
    """Calibration of one set of positions: confidence (N,), is_correct (N,), entropy (N,) or None for zeros."""
    acc = CalibrationAccumulator(n_bins, confidence.device)
    acc.add(confidence, is_correct, torch.zeros_like(confidence) if entropy is None else entropy)
    return acc.result()
