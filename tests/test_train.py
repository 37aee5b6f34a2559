"""Training end to end on tiny models: it overfits a small corpus and translates it back, saved
checkpoints reproduce the model exactly, and a resumed run logs the same losses as an
uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED, read_pairs, tiny_config, write_jsonl
from nmtkit.checkpoint import CheckpointError, load_checkpoint
from nmtkit.train import train
from nmtkit.translator import Translator


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in lines if "train_loss" in r}


@pytest.mark.slow
def test_tiny_model_overfits_32_pairs_and_translates_them_back(tmp_path: Path) -> None:
    rows = read_pairs(BUNDLED / "train.jsonl", 32)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    corpus = {"train": path, "valid": path, "test": path}
    cfg = tiny_config(
        corpus, tmp_path / "run",
        model={"d_model": 64, "n_heads": 4, "d_ff": 128, "n_enc_layers": 2, "n_dec_layers": 2, "dropout": 0.0},
        train={"max_steps": 250, "lr": 3e-3, "warmup_steps": 20, "schedule": "constant", "label_smoothing": 0.0,
               "eval_every": 250, "save_every": 250, "log_every": 50},
    )
    result = train(cfg)
    assert result.valid_loss < 0.05
    translator = Translator.from_checkpoint(tmp_path / "run", device="cpu")
    sources = [r["translation"]["en"] for r in rows]
    targets = [r["translation"]["zh"] for r in rows]
    outputs = [t.translation for t in translator.translate(sources)]
    assert outputs == targets


def test_saved_checkpoint_reproduces_the_model_outputs_exactly(trained_run: Path) -> None:
    a = Translator.from_checkpoint(trained_run, device="cpu")
    b = Translator.from_checkpoint(trained_run / "checkpoints" / "best.pt", device="cpu")
    src = a.encode_source(["Tell me something about yourself.", "Do you have a garage?"])
    tgt = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 0]])
    with torch.no_grad():
        assert torch.equal(a.model(src, tgt), b.model(src, tgt))
    assert [t.translation for t in a.translate(["Hello."])] == [t.translation for t in b.translate(["Hello."])]


def test_resumed_run_logs_the_same_losses_and_weights_as_an_uninterrupted_run(corpus: dict, tmp_path: Path) -> None:
    common = {"max_steps": 12, "log_every": 2, "eval_every": 6, "save_every": 6}
    straight = train(tiny_config(corpus, tmp_path / "straight", train=common, model={"dropout": 0.1}))
    half = tiny_config(corpus, tmp_path / "resumed", train={**common, "max_steps": 6}, model={"dropout": 0.1})
    train(half)
    resumed = train(tiny_config(corpus, tmp_path / "resumed", train=common, model={"dropout": 0.1}))
    assert resumed.state.step == straight.state.step == 12
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_model_config_is_refused_with_the_differences(corpus: dict, trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    with pytest.raises(CheckpointError, match=r"model\.d_ff: checkpoint 64, config 96"):
        train(tiny_config(corpus, run, model={"d_ff": 96}))


def test_a_changed_tokenizer_sample_size_does_not_block_resuming_but_a_vocabulary_change_does() -> None:
    # max_sentences only steers tokenizer training; a resumed run reuses the saved tokenizer
    from nmtkit.checkpoint import config_differences
    from nmtkit.config import Config

    saved = Config().to_dict()
    saved["tokenizer"]["max_sentences"] = 0
    assert config_differences(saved, Config().to_dict()) == []
    saved["tokenizer"]["vocab_size"] = 123
    assert config_differences(saved, Config().to_dict()) == [f"tokenizer.vocab_size: checkpoint 123, config {Config().tokenizer.vocab_size}"]


def test_resuming_allows_another_test_split_cache_folder_or_spelling_of_the_same_data_path() -> None:
    from nmtkit.checkpoint import config_differences
    from nmtkit.config import Config

    saved = Config().to_dict()
    saved["data"].update(test="elsewhere/test.jsonl", cache_dir="/tmp/arrow", train="./" + Config().data.train, valid="v.jsonl")
    saved["model"]["max_positions"] = 64  # sinusoidal: computed, not saved with the weights
    saved["model"].update(dropout=0.3, attention_dropout=0.1, activation_dropout=0.1)  # regularisation of later steps
    assert config_differences(saved, Config().to_dict()) == []
    saved["data"]["train"] = "other/train.jsonl"
    assert config_differences(saved, Config().to_dict()) == [f"data.train: checkpoint 'other/train.jsonl', config {Config().data.train!r}"]


def test_resuming_on_another_validation_split_forgets_the_old_best_loss(corpus: dict, trained_run: Path, tmp_path: Path, caplog) -> None:
    """Losses of two splits don't compare: the first evaluation on the new split makes best.pt."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("cache"))
    valid = write_jsonl(tmp_path / "other-valid.jsonl", read_pairs(corpus["test"], 20))
    with caplog.at_level("WARNING", logger="nmtkit"):
        result = train(tiny_config(corpus, run, data={"valid": str(valid)}, train={"max_steps": 18}))
    assert "the best valid loss so far" in caplog.text and "is forgotten" in caplog.text
    assert result.state.best_valid_loss < math.inf and load_checkpoint(run / "checkpoints" / "best.pt")["step"] >= 18


def test_gradient_accumulation_trains_like_one_larger_batch() -> None:
    """Two micro-batches accumulated by train_step give the same update as their union in one
    batch: the loss is normalised by the tokens of the whole optimizer step."""
    from nmtkit.batching import collate
    from nmtkit.config import ModelConfig
    from nmtkit.device import choose_runtime
    from nmtkit.loss import TrainingObjective
    from nmtkit.model import Transformer
    from nmtkit.step import train_step

    rows = {"src_ids": [[5, 6, 7], [8, 9], [10, 11, 12, 13]], "tgt_ids": [[14, 15], [16, 17, 18], [19]]}
    runtime = choose_runtime("cpu", "fp32")

    def weights_after_one_step(groups: list[dict]) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(d_model=32, n_heads=2, d_ff=64, n_enc_layers=1, n_dec_layers=1, dropout=0.0), 60, 60, True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        batches = [collate(g) for g in groups]
        n_tokens = sum(b.n_tgt_tokens for b in batches)
        train_step(TrainingObjective(model, 0.1, torch.float32), optimizer, scaler, batches, n_tokens, runtime, 0.1, 0.0)
        return [p.detach().clone() for p in model.parameters()]

    whole = weights_after_one_step([rows])
    split = weights_after_one_step([{k: v[:1] for k, v in rows.items()}, {k: v[1:] for k, v in rows.items()}])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_leaves_weights_and_adamw_state_as_they_were(fused: bool, tmp_path: Path) -> None:
    """The skip happens on the device (fused AdamW's found_inf), or on the host for other optimizers; the
    returned flag says which steps were skipped, and a finite step after it trains normally."""
    a_non_finite_step_is_skipped_and_counted("cpu", fused, tmp_path)


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_fp16_step_at_a_loss_scale_of_1_or_less_is_skipped_and_counted(fused: bool, tmp_path: Path) -> None:
    """fp16 (CUDA's, run here through CPU autocast): the grad scaler skips the update and halves its scale; at a scale
    of 1 or less (fp16 gradients that overflow unscaled) the step counts as skipped, so max_bad_steps in a row stop
    a run whose fp16 loss stays non-finite."""
    a_non_finite_step_is_skipped_and_counted("cpu", fused, tmp_path, precision="fp16", init_scale=1.0)


def test_an_fp16_overflow_while_the_grad_scaler_searches_its_scale_is_not_counted(tmp_path: Path) -> None:
    """At a scale above 1 an overflow is the scaler's search (it starts at 2**16 and halves): skipped, not counted,
    so it can never add up to a DivergenceError."""
    a_non_finite_step_is_skipped_and_counted("cpu", True, tmp_path, precision="fp16", init_scale=2.0**8)


def a_non_finite_step_is_skipped_and_counted(
    device: str, fused: bool, tmp_path: Path, precision: str = "fp32", init_scale: float = 2.0**8
) -> None:
    """(Also run on a GPU by test_cuda.py.) A step whose gradients are not finite leaves weights and AdamW state as
    they were; its flag, read back a step late (`SkippedSteps`), counts it as skipped."""
    from nmtkit.batching import collate
    from nmtkit.config import ModelConfig
    from nmtkit.device import Runtime
    from nmtkit.loss import TrainingObjective
    from nmtkit.model import Transformer
    from nmtkit.resume import TrainState
    from nmtkit.step import SkippedSteps, train_step

    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_heads=2, d_ff=64, n_enc_layers=1, n_dec_layers=1, dropout=0.0), 60, 60, True).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
    # (fp16) start scales this small model's gradients never overflow at, so the first step is a good one
    scaler = torch.amp.GradScaler(device, init_scale=init_scale, enabled=precision == "fp16")
    batch = collate({"src_ids": [[5, 6, 7], [8, 9]], "tgt_ids": [[14, 15], [16, 17, 18]]}).to(torch.device(device))
    # built directly: choose_runtime keeps fp16 to CUDA, while CPU autocast runs it too
    runtime = Runtime(torch.device(device), precision, "test")
    objective = TrainingObjective(model, 0.1, runtime.dtype)
    state = TrainState()
    skipped = SkippedSteps(state, max_bad_steps=5, last_checkpoint=tmp_path / "last.pt")

    def step(number: int) -> torch.Tensor:
        loss, is_bad = train_step(objective, optimizer, scaler, [batch], batch.n_tgt_tokens, runtime, 0.01, 1.0, check_finite=True)
        skipped.add(number, is_bad, batch.n_tgt_tokens)
        return is_bad

    assert not bool(step(1))
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    with torch.no_grad():
        model.tgt_embed.weight[5, 0] = float("inf")  # every gradient becomes non-finite
    poisoned = model.tgt_embed.weight.detach().clone()
    counted = not scaler.is_enabled() or init_scale <= 2.0  # fp16: once the halved scale is 1 or less
    assert bool(step(2)) == counted
    assert torch.equal(model.tgt_embed.weight, poisoned)
    for p, w, m in zip(model.parameters(), weights, moments):
        if p is not model.tgt_embed.weight:
            assert torch.equal(p, w)
        assert torch.equal(optimizer.state[p]["exp_avg"], m) and int(optimizer.state[p]["step"]) == 1
    tokens = batch.n_tgt_tokens if counted else 0
    assert skipped.settle() == tokens and (state.skipped_steps, state.bad_steps_in_a_row) == (int(counted), int(counted))
    if scaler.is_enabled():  # the scaler saw the same step as non-finite
        assert scaler.get_scale() == init_scale / 2


def test_the_progress_bar_stays_off_a_redirected_stderr(corpus: dict, tmp_path: Path, capsys) -> None:
    """train.progress_bar shows a bar on a terminal; a log file (stderr redirected) gets the log lines only, not a
    carriage return per update."""
    import yaml

    from conftest import tiny_tree
    from nmtkit.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(corpus, tmp_path / "run", train={"progress_bar": True, "max_steps": 3})), encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "step 3 | loss" in err and "\r" not in err and "step/s" not in err
