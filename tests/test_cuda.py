"""The package on a CUDA GPU gives the numbers it gives on CPU: the fused loss, attention through SDPA's
kernels, a training run in bf16, and greedy decoding with its per-token log. Skipped where torch sees no
CUDA device; scripts/gpu_benchmark.sh runs them on the device machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from nmtkit.model import attention
from nmtkit.tokenizer import PAD_ID
from nmtkit.translator import Translator
from test_loss import fused_loss_errors
from test_train import a_non_finite_step_is_skipped_and_counted

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_loss_on_cuda_equals_cross_entropy_loss_of_the_materialised_logits(dtype: torch.dtype, tolerance: float) -> None:
    assert max(fused_loss_errors(CUDA, dtype, size=(300, 64, 5000), chunk_rows=128)) < tolerance


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_attention_on_cuda_equals_the_cpu_attention_with_padding_and_causal_masks(is_causal: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 9, 16) for _ in range(3))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False  # a padded sentence; every query keeps at least its first key
    mask = None if is_causal else mask
    expected = attention(q, k, v, mask, is_causal)
    got = attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), None if mask is None else mask.to(CUDA), is_causal)
    assert relative_error(got, expected) < 1e-5


def test_training_on_cuda_in_bf16_lowers_the_loss_and_writes_a_checkpoint(corpus: dict[str, Path], tmp_path: Path) -> None:
    from nmtkit.train import train

    cfg = tiny_config(corpus, tmp_path / "run", train={"device": "cuda", "precision": "bf16", "max_steps": 30, "eval_every": 30,
                                                      "save_every": 30, "log_every": 5})
    result = train(cfg)
    losses = [r["train_loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert result.state.step == 30 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert math.isfinite(result.valid_loss)
    assert (result.run_dir / "checkpoints" / "last.pt").exists()


def test_greedy_decoding_on_cuda_gives_the_cpu_tokens_and_probabilities(trained_run: Path, corpus: dict[str, Path]) -> None:
    sources = [json.loads(line)["translation"]["en"] for line in corpus["test"].read_text(encoding="utf-8").splitlines()[:16]]
    on_cpu = Translator.from_checkpoint(trained_run, "cpu", "fp32").translate(sources)
    on_gpu = Translator.from_checkpoint(trained_run, "cuda", "fp32").translate(sources)
    for a, b in zip(on_cpu, on_gpu):
        assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
        for x, y in zip(a.tokens, b.tokens):
            assert y.prob == pytest.approx(x.prob, abs=1e-4) and y.entropy == pytest.approx(x.entropy, abs=1e-3)


def test_bf16_decoding_on_cuda_keeps_the_per_token_log_consistent(trained_run: Path) -> None:
    translations = Translator.from_checkpoint(trained_run, "cuda", "bf16").translate(["Tell me something about yourself", "Hello."], top_k=3)
    for t in translations:
        assert t.tokens
        for step in t.tokens:
            assert 0.0 < step.prob <= 1.0 and step.loss == pytest.approx(-math.log(step.prob), abs=1e-4)
            assert step.entropy >= 0.0 and step.top_k[0].prob >= step.prob - 1e-6
        assert t.total_loss == pytest.approx(sum(s.loss for s in t.tokens), rel=1e-4)


def test_matmul_attention_kernel_on_cuda_gives_the_sdpa_loss_and_gradients() -> None:
    from nmtkit.config import ModelConfig
    from nmtkit.loss import TrainingObjective
    from nmtkit.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=4, d_ff=128, n_enc_layers=2, n_dec_layers=2, dropout=0.0, max_positions=64)
    sdpa = Transformer(cfg, 500, 500, True, attention_kernel="auto").to(CUDA)
    matmul = Transformer(cfg, 500, 500, True, attention_kernel="matmul").to(CUDA)
    matmul.load_state_dict(sdpa.state_dict())
    src, tgt_in, tgt_out = (torch.randint(4, 500, (6, n), device=CUDA) for n in (13, 11, 11))
    src[0, -3:] = PAD_ID
    tgt_out[1, -4:] = PAD_ID
    results = []
    for model in (sdpa, matmul):
        loss = TrainingObjective(model, 0.1, torch.float32)(src, tgt_in, tgt_out)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (want, want_grads), (got, got_grads) = results
    assert relative_error(got, want) < 1e-5
    for g, w in zip(got_grads, want_grads):
        assert relative_error(g, w) < 1e-4


@pytest.mark.parametrize("top_k", [0, 3])
def test_cuda_graph_decoding_gives_the_tokens_and_probabilities_of_eager_steps(trained_run: Path, corpus: dict[str, Path], top_k: int) -> None:
    from nmtkit.decode import greedy_decode

    translator = Translator.from_checkpoint(trained_run, "cuda", "fp32")
    assert translator.uses_cuda_graphs  # decode.cuda_graphs is on by default
    sources = [json.loads(line)["translation"]["en"] for line in corpus["test"].read_text(encoding="utf-8").splitlines()[:24]]
    src = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(ids + [3]) for ids in translator.tokenizer.encode_src(sources)], batch_first=True, padding_value=PAD_ID
    ).to(CUDA)
    with translator.runtime.compute():
        eager = greedy_decode(translator.model, src, 20, top_k=top_k)
        graphed = greedy_decode(translator.model, src, 20, top_k=top_k, static=True)
    assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.lengths, eager.lengths)
    if top_k:
        torch.testing.assert_close(graphed.probs, eager.probs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_on_cuda_is_skipped_on_the_device_and_counted_a_step_late(fused: bool, precision: str, tmp_path: Path) -> None:
    """Fused AdamW's found_inf (fp16: the grad scaler's) skips the update in the kernel; the flag comes back through
    pinned memory."""
    a_non_finite_step_is_skipped_and_counted("cuda", fused, tmp_path, precision=precision, init_scale=1.0 if precision == "fp16" else 2.0**8)


# last in the file: it compiles cold graphs (tens of seconds), so a GPU kit's time limit cuts it, not the tests above
def test_compiled_objective_on_cuda_gives_the_eager_loss_and_gradients() -> None:
    from nmtkit.config import ModelConfig
    from nmtkit.loss import TrainingObjective
    from nmtkit.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=4, d_ff=128, n_enc_layers=2, n_dec_layers=2, dropout=0.0, max_positions=64)
    model = Transformer(cfg, 500, 500, is_joint_vocab=True).to(CUDA)
    eager = TrainingObjective(model, 0.1, torch.float32)
    compiled = TrainingObjective(model, 0.1, torch.float32, compile=True)
    for B, S, T in [(8, 11, 9), (5, 17, 21)]:
        src, tgt_in, tgt_out = (torch.randint(4, 500, (B, n), device=CUDA) for n in (S, T, T))
        src[0, -3:] = PAD_ID
        tgt_out[1, -4:] = PAD_ID
        results = []
        for objective in (eager, compiled):
            loss = objective(src, tgt_in, tgt_out)
            results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
        (want, want_grads), (got, got_grads) = results
        assert relative_error(got, want) < 1e-5
        for g, w in zip(got_grads, want_grads):
            assert relative_error(g, w) < 1e-4

