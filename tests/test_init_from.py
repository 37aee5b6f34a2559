"""train.init_from: fine-tuning starts a new run from another run's weights and tokenizer, with its own optimizer,
schedule and step; a different model shape or tokenizer is refused, naming what differs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import tiny_config
from nmtkit.checkpoint import CheckpointError, load_checkpoint
from nmtkit.config import ConfigError
from nmtkit.tokenizer import Tokenizer
from nmtkit.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_fine_tuning_run_starts_from_the_checkpoints_weights_and_tokenizer(corpus: dict, trained_run: Path, tmp_path: Path, caplog) -> None:
    """At a learning rate of ~0 one step leaves the weights where train.init_from put them; dropout may differ."""
    run = tmp_path / "finetune"
    cfg = tiny_config(corpus, run, model={"dropout": 0.3}, train={"init_from": str(trained_run), "lr": 1e-12, "warmup_steps": 0, "max_steps": 1})
    with caplog.at_level(logging.INFO, logger="nmtkit"):
        result = train(cfg)
    assert result.state.step == 1  # its own step count, not the checkpoint's
    assert Tokenizer.load(run / "tokenizer").fingerprint == Tokenizer.load(trained_run / "tokenizer").fingerprint
    start = load_checkpoint(trained_run / "checkpoints" / "best.pt")["model"]
    after = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert max((after[k].float() - start[k].float()).abs().max().item() for k in start) < 1e-6
    assert "from train.init_from" in caplog.text


def test_a_fresh_run_differs_from_the_fine_tuned_one(corpus: dict, trained_run: Path, tmp_path: Path) -> None:
    """The comparison above can fail: without init_from, the same step starts from random weights."""
    train(tiny_config(corpus, tmp_path / "fresh", train={"lr": 1e-12, "warmup_steps": 0, "max_steps": 1}))
    start = load_checkpoint(trained_run / "checkpoints" / "best.pt")["model"]
    fresh = load_checkpoint(tmp_path / "fresh" / "checkpoints" / "last.pt")["model"]
    assert max((fresh[k].float() - start[k].float()).abs().max().item() for k in start if fresh[k].shape == start[k].shape) > 1e-3


def test_another_model_shape_is_refused_naming_the_keys(corpus: dict, trained_run: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corpus, tmp_path / "run", model={"d_ff": 128}, train={"init_from": str(trained_run)})
    with pytest.raises(ConfigError, match=r"model\.d_ff: train.init_from's checkpoint has 64, the config 128"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_another_tokenizer_in_the_run_directory_is_refused(corpus: dict, trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(corpus, run, tokenizer={"type": "bpe"}, train={"max_steps": 1}))  # a tokenizer of its own
    for f in (run / "checkpoints").iterdir():  # no checkpoint to resume: the next start takes train.init_from
        f.unlink()
    with pytest.raises(ConfigError, match="holds another tokenizer than the checkpoint's"):
        train(tiny_config(corpus, run, train={"init_from": str(trained_run), "max_steps": 2}))


def test_a_run_with_its_own_checkpoint_resumes_instead(corpus: dict, trained_run: Path, tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    settings = {"init_from": str(trained_run), "max_steps": 1}
    train(tiny_config(corpus, run, train=settings))
    with caplog.at_level(logging.INFO, logger="nmtkit"):
        result = train(tiny_config(corpus, run, train={**settings, "max_steps": 2}))
    assert result.state.step == 2 and "is not used" not in caplog.text  # the run's own start, named again
    other = str(trained_run / "checkpoints" / "last.pt")
    with caplog.at_level(logging.INFO, logger="nmtkit"):
        result = train(tiny_config(corpus, run, train={"init_from": other, "max_steps": 3}))
    assert result.state.step == 3
    assert f"train.init_from {other!r} is not used: {run} resumes from its own checkpoint (which started from {str(trained_run)!r})" in caplog.text


def test_a_missing_init_checkpoint_is_a_clear_error(corpus: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.init_from: checkpoint not found: .*nope"):  # before any data is read or cached
        train(tiny_config({**corpus, "train": tmp_path / "missing.jsonl"}, tmp_path / "run", train={"init_from": str(tmp_path / "nope")}))
    assert not (tmp_path / "run" / "cache").exists()


def test_separate_vocabularies_read_in_the_other_direction_are_warned_about(corpus: dict, tmp_path: Path, caplog) -> None:
    """A checkpoint with separate en and zh vocabularies, fine-tuned zh -> en, would read Chinese with the English model."""
    train(tiny_config(corpus, tmp_path / "en-zh", tokenizer={"joint": False, "vocab_size": 1000}, train={"max_steps": 1}))
    with caplog.at_level(logging.WARNING, logger="nmtkit"):
        train(tiny_config(corpus, tmp_path / "zh-en", data={"src_lang": "zh", "tgt_lang": "en"},
                          train={"init_from": str(tmp_path / "en-zh"), "max_steps": 1}))
    assert "separate vocabularies for en -> zh, and this run reads zh -> en" in caplog.text


def test_a_tokenizer_copied_for_fine_tuning_is_not_taken_for_the_configs_own(corpus: dict, trained_run: Path, tmp_path: Path) -> None:
    """A fine-tuning start that ended before its first checkpoint leaves the checkpoint's tokenizer behind: a start
    without train.init_from must not train from scratch on it as if the config had made it."""
    run = tmp_path / "run"
    settings = {"init_from": str(trained_run), "max_steps": 1}
    train(tiny_config(corpus, run, train=settings))
    last = run / "checkpoints" / "last.pt"
    kept = last.read_bytes()
    for f in (run / "checkpoints").iterdir():
        f.unlink()
    with pytest.raises(ConfigError, match="is the tokenizer of train.init_from .* no checkpoint of this run uses it yet"):
        train(tiny_config(corpus, run, train={"max_steps": 2}))
    last.write_bytes(kept)  # with its checkpoint, the fine-tuned run resumes without naming init_from again
    assert train(tiny_config(corpus, run, train={"max_steps": 2})).state.step == 2


def test_a_fine_tuned_run_resumes_whatever_its_unused_tokenizer_section_says(corpus: dict, trained_run: Path, tmp_path: Path) -> None:
    """Its tokenizer is the checkpoint's, so the config's tokenizer section made nothing and may change."""
    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"init_from": str(trained_run), "max_steps": 1}))
    resumed = train(tiny_config(corpus, run, tokenizer={"vocab_size": 8000, "type": "bpe"}, train={"max_steps": 2}))
    assert resumed.state.step == 2
    with pytest.raises(CheckpointError, match=r"model\.d_ff"):  # the model section still has to match
        train(tiny_config(corpus, run, model={"d_ff": 128}, train={"max_steps": 3}))
