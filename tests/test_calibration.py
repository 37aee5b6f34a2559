"""Calibration: ECE on constructed cases with a known answer, bins that partition [0, 1], statistics taken from
logits (top-1 probability, argmax vs reference, entropy, PAD skipped), and `nmtkit evaluate` reporting it all."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nmtkit.calibration import N_BINS, CalibrationAccumulator, calibration_of
from nmtkit.cli import main
from nmtkit.tokenizer import PAD_ID

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def correct_share(n: int, share: float) -> torch.Tensor:
    """n flags, the first round(n * share) True."""
    return torch.arange(n) < round(n * share)


def test_confidence_that_matches_accuracy_has_zero_ece() -> None:
    c = calibration_of(torch.full((100,), 0.8), correct_share(100, 0.8))
    assert c.ece == pytest.approx(0.0, abs=1e-6)


def test_overconfidence_shows_as_the_gap_between_confidence_and_accuracy() -> None:
    c = calibration_of(torch.full((100,), 0.9), correct_share(100, 0.5))
    assert c.ece == pytest.approx(0.4, abs=1e-6)


def test_ece_weights_each_bin_by_its_share_of_tokens() -> None:
    # 30 tokens at 0.3 with 20 correct (gap |0.667 - 0.3| = 0.3667) and 70 at 0.9 with 63 correct (gap 0):
    # ECE = 0.3 * 0.3667 + 0.7 * 0 = 0.11
    confidence = torch.cat([torch.full((30,), 0.3), torch.full((70,), 0.9)])
    is_correct = torch.cat([correct_share(30, 20 / 30), correct_share(70, 0.9)])
    c = calibration_of(confidence, is_correct)
    assert c.ece == pytest.approx(0.3 * abs(20 / 30 - 0.3), abs=1e-6)
    filled = [b for b in c.bins if b.count]
    assert [(b.count, round(b.accuracy, 4)) for b in filled] == [(30, round(20 / 30, 4)), (70, 0.9)]
    assert filled[0].lower <= 0.3 < filled[0].upper and filled[1].lower <= 0.9 < filled[1].upper


def test_bins_partition_zero_to_one_and_one_lands_in_the_last() -> None:
    c = calibration_of(torch.tensor([0.0, 1 / 15, 0.5, 1.0]), torch.tensor([False, True, True, True]))
    assert len(c.bins) == N_BINS and c.bins[0].lower == 0.0 and c.bins[-1].upper == 1.0
    assert all(a.upper == pytest.approx(b.lower) for a, b in zip(c.bins, c.bins[1:]))
    assert [c.bins[i].count for i in (0, 1, 7, 14)] == [1, 1, 1, 1] and sum(b.count for b in c.bins) == 4


def test_statistics_from_logits_are_top1_probability_argmax_match_and_entropy_skipping_pad() -> None:
    torch.manual_seed(0)
    logits = torch.randn(10, 6)
    logits[:, PAD_ID] = -10.0  # so neither an argmax nor a wrong target below is PAD by chance
    targets = logits.argmax(-1)
    targets[:5] = logits[:5, 1:].argmin(-1) + 1  # five wrong
    targets[8:] = PAD_ID
    acc = CalibrationAccumulator()
    acc.add_logits(logits, targets)
    c = acc.result()
    p = logits[:8].softmax(-1)
    assert c.tokens == 8
    assert sum(b.count * b.accuracy for b in c.bins) == pytest.approx(3)  # 8 real, 5 wrong
    assert sum(b.count * b.mean_confidence for b in c.bins) == pytest.approx(p.max(-1).values.sum().item(), rel=1e-5)
    assert c.mean_entropy == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)


def test_uniform_predictions_have_entropy_log_v() -> None:
    acc = CalibrationAccumulator()
    acc.add_logits(torch.zeros(5, 8), torch.tensor([4, 5, 6, 7, 4]))
    assert acc.result().mean_entropy == pytest.approx(math.log(8), rel=1e-6)


def test_batches_accumulate_like_one_batch() -> None:
    torch.manual_seed(0)
    confidence, is_correct, entropy = torch.rand(200), torch.rand(200) < 0.6, torch.rand(200)
    whole = calibration_of(confidence, is_correct, entropy)
    acc = CalibrationAccumulator()
    for part in torch.arange(200).split(37):
        acc.add(confidence[part], is_correct[part], entropy[part])
    assert acc.result() == whole


# ----------------------------------------------------------------------------- nmtkit evaluate


def test_evaluate_json_reports_calibration_consistent_with_accuracy(trained_run: Path, capsys) -> None:
    assert main(["evaluate", "--checkpoint", str(trained_run), "--json", "--no-bleu", "--limit", "10"]) == 0
    m = json.loads(capsys.readouterr().out)
    bins = m["calibration_bins"]
    assert len(bins) == N_BINS and set(bins[0]) == {"lower", "upper", "count", "mean_confidence", "accuracy"}
    assert sum(b["count"] for b in bins) == m["tokens"]
    # the same argmax decides "correct" in both, so the bins' accuracy adds up to the token accuracy
    assert sum(b["count"] * b["accuracy"] for b in bins) / m["tokens"] == pytest.approx(m["token_accuracy"])
    assert 0.0 <= m["ece"] <= 1.0 and m["mean_entropy"] > 0


def test_evaluate_table_shows_ece_and_mean_entropy_and_plot_writes_a_png(trained_run: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(["evaluate", "--checkpoint", str(trained_run), "--no-bleu", "--limit", "10", "--plot", str(tmp_path / "figs")]) == 0
    )
    out = capsys.readouterr().out
    assert "ECE" in out and "mean entropy" in out
    png = tmp_path / "figs" / "reliability.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and str(png) in out
