"""What training promises beyond "the loss goes down": the objective is label-smoothed cross-entropy over the model's
logits, best.pt is the lowest validation loss and is what loading a run gives, patience and the last save follow the
validation losses, the learning rate follows its schedule from the first step, validation runs without dropout, the
optimizer decays only matrices and clips, and the step is normalised by its real target tokens.

Validation losses are scripted (nmtkit.train.teacher_forced_metrics replaced) where a test is about what training
does with them, so no test depends on what a tiny model happens to learn."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import nmtkit.train as train_module
from conftest import tiny_config
from nmtkit.batching import collate
from nmtkit.checkpoint import checkpoint_dir, load_checkpoint, resolve_checkpoint
from nmtkit.config import ModelConfig, TrainConfig
from nmtkit.device import choose_runtime
from nmtkit.evaluate import LossMetrics, teacher_forced_metrics
from nmtkit.loss import TrainingObjective
from nmtkit.model import Transformer, sinusoidal_positions
from nmtkit.schedule import lr_at
from nmtkit.step import make_optimizer, train_step
from nmtkit.tokenizer import PAD_ID
from nmtkit.train import train
from nmtkit.translator import Translator

V = 60


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(dropout: float = 0.0, tie: bool = True) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_enc_layers=1, n_dec_layers=1, dropout=dropout, tie_embeddings=tie, max_positions=64)
    return Transformer(cfg, V, V, True)


def padded_batch():
    """Three pairs of different lengths, so tgt_out has padding."""
    return collate({"src_ids": [[5, 6, 7, 8], [9, 10], [11, 12, 13]], "tgt_ids": [[14, 15], [16, 17, 18, 19, 20], [21]]})


def script_validation(monkeypatch: pytest.MonkeyPatch, losses: list[float]) -> list[int]:
    """Make training's validation return `losses` in turn (the last one from then on); returns the list of steps
    at which validation ran (filled as training runs)."""
    calls: list[int] = []

    def scripted(model, ds, max_tokens, runtime, calibration=None) -> LossMetrics:
        loss = losses[min(len(calls), len(losses) - 1)]
        calls.append(len(calls) + 1)
        return LossMetrics(loss, math.exp(loss), 0.5, len(ds), 100)

    monkeypatch.setattr(train_module, "teacher_forced_metrics", scripted)
    return calls


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- 1. the objective


def test_training_objective_is_label_smoothed_cross_entropy_summed_over_the_models_logits() -> None:
    model = tiny_model()
    batch = padded_batch()
    assert (batch.tgt_out == PAD_ID).any()
    params = list(model.parameters())
    objective = TrainingObjective(model, 0.1, torch.float32)
    got = objective(batch.src, batch.tgt_in, batch.tgt_out)
    got_grads = torch.autograd.grad(got, params)
    logits = model(batch.src, batch.tgt_in)  # (B, T, V): the model's own full forward pass
    want = nn.CrossEntropyLoss(ignore_index=PAD_ID, label_smoothing=0.1, reduction="sum")(logits.flatten(0, 1), batch.tgt_out.flatten())
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- 2. best.pt and what loads


def test_best_pt_is_the_evaluation_with_the_lowest_loss_and_loading_a_run_gives_it(
    corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script_validation(monkeypatch, [2.0, 1.0, 3.0])
    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"max_steps": 3, "eval_every": 1, "save_every": 100, "log_every": 100}))
    ckpts = checkpoint_dir(run)
    assert load_checkpoint(ckpts / "best.pt")["step"] == 2
    assert load_checkpoint(ckpts / "last.pt")["step"] == 3
    assert load_checkpoint(resolve_checkpoint(run))["step"] == 2
    assert load_checkpoint(resolve_checkpoint(run, "last"))["step"] == 3
    best = load_checkpoint(ckpts / "best.pt")["model"]
    last = load_checkpoint(ckpts / "last.pt")["model"]
    loaded = Translator.from_checkpoint(run, "cpu", "fp32").model.state_dict()
    assert all(torch.equal(loaded[k].float(), best[k].float()) for k in best)
    assert any(not torch.equal(loaded[k].float(), last[k].float()) for k in last)  # steps 2 and 3 differ


# ----------------------------------------------------------------------------- 3. patience


def test_patience_stops_the_run_after_that_many_evaluations_without_improvement(
    corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluations = script_validation(monkeypatch, [1.0, 1.5, 1.2, 1.1])  # the first is never beaten
    result = train(tiny_config(corpus, tmp_path / "run", train={"max_steps": 30, "eval_every": 1, "save_every": 100, "log_every": 100, "patience": 2}))
    assert result.state.step == 3 and len(evaluations) == 3
    assert "train.patience" in result.stop_reason
    assert result.state.evals_without_improvement == 2 and result.state.best_valid_loss == 1.0


# ----------------------------------------------------------------------------- 4. the learning-rate schedule


def test_warmup_rises_linearly_to_the_peak_lr_at_warmup_steps() -> None:
    tc = TrainConfig(lr=1e-3, warmup_steps=10, schedule="inverse_sqrt")
    for step in range(1, 11):
        assert lr_at(step, tc) == pytest.approx(1e-3 * step / 10)
    assert lr_at(10, tc) == pytest.approx(1e-3)


def test_inverse_sqrt_halves_the_lr_at_four_times_the_warmup() -> None:
    tc = TrainConfig(lr=1e-3, warmup_steps=100, schedule="inverse_sqrt")
    assert lr_at(400, tc) == pytest.approx(0.5e-3)
    assert lr_at(1600, tc) == pytest.approx(0.25e-3)


def test_cosine_decays_from_the_peak_to_min_lr_at_max_steps() -> None:
    tc = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, schedule="cosine", max_steps=110)
    assert lr_at(10, tc) == pytest.approx(1e-3)
    assert lr_at(60, tc) == pytest.approx((1e-3 + 1e-5) / 2)  # half way: the cosine's midpoint
    assert lr_at(110, tc) == pytest.approx(1e-5)
    assert lr_at(200, tc) == pytest.approx(1e-5)


def test_constant_schedule_stays_at_the_peak_after_warmup() -> None:
    tc = TrainConfig(lr=1e-3, warmup_steps=4, schedule="constant")
    assert [lr_at(s, tc) for s in (4, 5, 100, 10_000)] == pytest.approx([1e-3] * 4)


def test_each_training_step_runs_at_the_lr_of_its_own_one_based_step(corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script_validation(monkeypatch, [1.0])
    used: list[float] = []
    real_step = train_module.train_step

    def spy(objective, optimizer, scaler, batches, n_tokens, runtime, lr, clip_norm, **kwargs):
        used.append(lr)
        return real_step(objective, optimizer, scaler, batches, n_tokens, runtime, lr, clip_norm, **kwargs)

    monkeypatch.setattr(train_module, "train_step", spy)
    run = tmp_path / "run"
    cfg = tiny_config(corpus, run, train={"max_steps": 3, "warmup_steps": 5, "eval_every": 100, "save_every": 100, "log_every": 1})
    train(cfg)
    want = [lr_at(s, cfg.train) for s in (1, 2, 3)]
    assert want[0] == pytest.approx(cfg.train.lr / 5)  # the first update is not a zero-lr step
    assert used == pytest.approx(want)
    logged = {r["step"]: r["lr"] for r in metrics_lines(run) if "lr" in r}
    assert [logged[s] for s in (1, 2, 3)] == pytest.approx(want)


# ----------------------------------------------------------------------------- 5. validation without dropout


def test_validation_runs_the_model_in_eval_mode_and_restores_training_mode() -> None:
    import datasets

    model = tiny_model(dropout=0.5).train()
    rows = {"src_ids": [[5, 6, 7, 8], [9, 10], [11, 12, 13]], "tgt_ids": [[14, 15], [16, 17, 18, 19, 20], [21]]}
    ds = datasets.Dataset.from_dict({**rows, "src_len": [len(x) for x in rows["src_ids"]], "tgt_len": [len(x) for x in rows["tgt_ids"]]})
    runtime = choose_runtime("cpu", "fp32")
    first = teacher_forced_metrics(model, ds, 64, runtime)
    assert model.training
    second = teacher_forced_metrics(model, ds, 64, runtime)
    assert model.training
    assert first.loss == second.loss
    eval_loss = teacher_forced_metrics(model.eval(), ds, 64, runtime).loss
    assert not model.training
    assert first.loss == pytest.approx(eval_loss, rel=1e-6)


# ----------------------------------------------------------------------------- 6. the last steps are saved


def test_a_run_stopping_between_saves_saves_its_last_step_without_a_validation_improvement(
    corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script_validation(monkeypatch, [1.0])  # constant: only the first evaluation is best
    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"max_steps": 7, "eval_every": 1, "save_every": 5, "log_every": 100}))
    assert load_checkpoint(checkpoint_dir(run) / "last.pt")["step"] == 7
    assert load_checkpoint(checkpoint_dir(run) / "best.pt")["step"] == 1


# ----------------------------------------------------------------------------- 8. the optimizer and the step


def test_weight_decay_applies_to_matrices_only_and_each_tied_weight_once(tmp_path: Path) -> None:
    model = tiny_model(tie=True)
    cfg = tiny_config({"train": "t", "valid": "v", "test": "x"}, tmp_path, train={"weight_decay": 0.05})
    optimizer = make_optimizer(model, cfg, choose_runtime("cpu", "fp32"))
    decay_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in decay_of, "a parameter is in the optimizer twice"
            decay_of[id(p)] = group["weight_decay"]
    names = dict(model.named_parameters())  # tied weights are listed once here
    assert model.src_embed.weight is model.tgt_embed.weight and set(decay_of) == {id(p) for p in names.values()}
    for name, p in names.items():
        is_bias_or_norm = name.endswith("bias") or "norm" in name
        assert decay_of[id(p)] == (0.0 if is_bias_or_norm else 0.05), name
    assert decay_of[id(model.tgt_embed.weight)] == 0.05 and decay_of[id(model.decoder[0].norm1.weight)] == 0.0


@pytest.mark.parametrize("clip_norm", [1e-3, 0.0], ids=["clipped", "no-clipping"])
def test_train_step_clips_the_gradient_norm_to_clip_norm(clip_norm: float) -> None:
    """With plain SGD at lr 1 the update is the gradient: its norm is clip_norm when clipped, the full norm when not."""
    model = tiny_model()
    objective = TrainingObjective(model, 0.1, torch.float32)
    batch = padded_batch()
    params = list({id(p): p for p in model.parameters()}.values())
    grad_norm = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(g) for g in torch.autograd.grad(objective(batch.src, batch.tgt_in, batch.tgt_out) / batch.n_tgt_tokens, params)
    ])).item()
    assert grad_norm > 1e-2
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    train_step(objective, optimizer, torch.amp.GradScaler("cpu", enabled=False), [batch], batch.n_tgt_tokens, choose_runtime("cpu", "fp32"), 1.0, clip_norm)
    update = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach() - b) for p, b in zip(params, before)])).item()
    assert update == pytest.approx(clip_norm if clip_norm else grad_norm, rel=1e-3)


def test_a_training_step_is_normalised_by_its_non_pad_target_tokens_eos_included(
    corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script_validation(monkeypatch, [1.0])
    seen: list[tuple[int, int, int]] = []
    real_step = train_module.train_step

    def spy(objective, optimizer, scaler, batches, n_tokens, runtime, lr, clip_norm, **kwargs):
        real = sum(int((b.tgt_out != PAD_ID).sum()) for b in batches)
        seen.append((n_tokens, real, sum(b.n_tgt_tokens for b in batches)))
        return real_step(objective, optimizer, scaler, batches, n_tokens, runtime, lr, clip_norm, **kwargs)

    monkeypatch.setattr(train_module, "train_step", spy)
    result = train(tiny_config(corpus, tmp_path / "run", train={"max_steps": 3, "accum_steps": 2, "eval_every": 100, "save_every": 100, "log_every": 100}))
    assert len(seen) == 3
    for n_tokens, real, counted in seen:
        assert n_tokens == real == counted
    assert result.state.tokens_seen == sum(n for n, _, _ in seen)


# ----------------------------------------------------------------------------- 9. sinusoidal positions


def test_sinusoidal_positions_are_sine_at_even_and_cosine_at_odd_dimensions() -> None:
    n, d = 50, 16
    table = sinusoidal_positions(n, d)
    want = torch.empty(n, d, dtype=torch.float64)
    for pos in range(n):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            want[pos, 2 * i] = math.sin(angle)
            want[pos, 2 * i + 1] = math.cos(angle)
    torch.testing.assert_close(table.double(), want, atol=1e-5, rtol=0)
    model = tiny_model()
    torch.testing.assert_close(model.positions.double(), sinusoidal_positions(64, 32).double())
    assert model.positions[0, 0] == 0.0 and model.positions[0, 1] == 1.0  # position 0: sin 0, cos 0
