"""Divergence guards: a step with a non-finite gradient is skipped, and too many in a row stop the run
with DivergenceError before anything non-finite reaches a checkpoint.

NaNs are injected by wrapping `Transformer.decode` so that chosen training forward passes return NaN
decoder states (and so a NaN loss and NaN gradients); evaluation and translation (model.training False)
are left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    one_torch_thread,  # noqa: F401 (autouse: tiny models train on one thread)
    run_main,
    write_config,
)

from conftest import tiny_config
from nmtkit.checkpoint import load_checkpoint
from nmtkit.model import Transformer
from nmtkit.step import DivergenceError
from nmtkit.train import train


def poison_training_steps(monkeypatch: pytest.MonkeyPatch, is_bad: Callable[[int], bool]) -> None:
    """Make the n-th training forward pass (1-based) produce NaNs when is_bad(n)."""
    decode = Transformer.decode
    calls = 0

    def decode_with_nans(self: Transformer, memory: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor, *args) -> torch.Tensor:
        nonlocal calls
        hidden = decode(self, memory, src_mask, tgt_in, *args)
        if not self.training:
            return hidden
        calls += 1
        return hidden * float("nan") if is_bad(calls) else hidden

    monkeypatch.setattr(Transformer, "decode", decode_with_nans)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_isolated_nan_steps_are_skipped_and_training_completes(
    corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """max_bad_steps=2 also proves the in-a-row counter resets after a good step."""
    poison_training_steps(monkeypatch, lambda n: n in (4, 7))
    with caplog.at_level(logging.INFO, logger="nmtkit"):
        result = train(tiny_config(corpus, tmp_path / "run", train={"max_bad_steps": 2}))

    assert result.state.step == 12 and result.state.skipped_steps == 2 and result.state.bad_steps_in_a_row == 0
    weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    skipped = [r.getMessage() for r in caplog.records if "non-finite gradient, update skipped" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == ["step 4", "step 7"]
    assert any(r.getMessage().startswith("step 12 | loss") and "| skipped 2" in r.getMessage() for r in caplog.records)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in records if "train_loss" in r)  # NaN losses are not averaged in
    # the running count of skipped steps is in metrics.jsonl too (step 3: none yet; step 6: step 4; from step 9: both)
    assert [(r["step"], r["skipped_steps"]) for r in records if "train_loss" in r] == [(3, 0), (6, 1), (9, 2), (12, 2)]


def test_a_log_window_whose_every_step_was_skipped_shows_no_loss(
    corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps 4-6 skipped, a line every 3 steps: the line at step 6 trained on nothing. A loss of 0.0 there would look
    like a perfect window in the log, the plot and TensorBoard."""
    poison_training_steps(monkeypatch, lambda n: n in (4, 5, 6))
    with caplog.at_level(logging.INFO, logger="nmtkit"):
        train(tiny_config(corpus, tmp_path / "run", train={"max_steps": 9, "max_bad_steps": 5}))
    assert any(r.getMessage().startswith("step 6 | loss n/a (every step skipped) |") for r in caplog.records)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "lr" in r}
    assert "train_loss" not in by_step[6] and by_step[6]["skipped_steps"] == 3
    assert math.isfinite(by_step[3]["train_loss"]) and math.isfinite(by_step[9]["train_loss"])


def test_nan_on_every_step_raises_divergence_error_and_leaves_the_last_checkpoint_untouched(
    corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    train(tiny_config(corpus, run_dir, train={"max_steps": 6}))
    last = run_dir / "checkpoints" / "last.pt"
    before = {p.name: sha256(p) for p in (run_dir / "checkpoints").iterdir()}

    poison_training_steps(monkeypatch, lambda n: True)
    with pytest.raises(DivergenceError) as info:
        train(tiny_config(corpus, run_dir, train={"max_steps": 30, "max_bad_steps": 3}))
    message = str(info.value)
    assert "3 steps in a row" in message and "train.max_bad_steps=3" in message
    assert f"{last}, is untouched" in message
    assert {p.name: sha256(p) for p in (run_dir / "checkpoints").iterdir()} == before
    assert load_checkpoint(last)["step"] == 6
    assert not (run_dir / "train.lock").exists()


def test_cli_exits_1_with_a_message_when_training_diverges(corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run", train={"max_bad_steps": 2})
    poison_training_steps(monkeypatch, lambda n: True)
    code, out, err = run_main(["train", "--config", str(config)])
    assert code == 1
    assert "nmtkit train: error: training diverged: 2 steps in a row" in err
    assert "Traceback" not in err


def test_a_checkpoint_written_on_a_signal_counts_the_skipped_step_just_before_it(
    corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step's non-finite flag is read a step late: a stop found right after a skipped step (here SIGTERM
    arriving during it) must still count that step before the checkpoint is written."""
    import os
    import signal

    poison_training_steps(monkeypatch, lambda n: n == 5)
    forward = Transformer.decode
    steps = {"forward": 0}

    def signal_during_step_5(self: Transformer, *args) -> torch.Tensor:
        steps["forward"] += self.training
        if self.training and steps["forward"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args)

    monkeypatch.setattr(Transformer, "decode", signal_during_step_5)
    result = train(tiny_config(corpus, tmp_path / "run", train={"max_bad_steps": 2}))

    assert "interrupted by" in result.stop_reason and result.state.step == 5
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["step"] == 5 and saved["train_state"]["skipped_steps"] == 1 and saved["train_state"]["bad_steps_in_a_row"] == 1
