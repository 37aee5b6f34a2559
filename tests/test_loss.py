"""The fused, chunked cross-entropy equals nn.CrossEntropyLoss on the projected logits, in value
and in gradients, with padding ignored and label smoothing applied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmtkit import native
from nmtkit.loss import chunk_loss_and_grad, projected_cross_entropy
from nmtkit.tokenizer import PAD_ID
from test_model import native_kernels


@pytest.fixture(params=["native", "torch"], autouse=True)
def chunk_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs twice on CPU: with nmtkit's chunk kernel (native.py) and with torch's ops."""
    if request.param == "torch":
        monkeypatch.setattr(native, "kernels", lambda: None)
    else:
        native_kernels()
    return request.param


def random_problem(seed: int, n: int, d: int, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (n, d) and weight (v, d) that require gradients, and targets (n,) in 1..v-1 (no padding yet)."""
    torch.manual_seed(seed)
    return torch.randn(n, d, requires_grad=True), torch.randn(v, d, requires_grad=True), torch.randint(1, v, (n,))


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """nn.CrossEntropyLoss on the materialised logits: what the fused loss must equal."""
    return nn.CrossEntropyLoss(ignore_index=PAD_ID, label_smoothing=smoothing, reduction="sum")(hidden @ weight.T, targets)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [3, 1024])
def test_chunked_loss_and_gradients_equal_cross_entropy_loss(smoothing: float, chunk_rows: int) -> None:
    hidden, weight, targets = random_problem(0, 10, 8, 20)
    targets[[2, 7]] = PAD_ID
    reference = reference_loss(hidden, weight, targets, smoothing)
    expected_grads = torch.autograd.grad(reference, [hidden, weight])
    fused = projected_cross_entropy(hidden, weight, targets, ignore_index=PAD_ID, label_smoothing=smoothing, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(fused, [hidden, weight])
    torch.testing.assert_close(fused, reference)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_gradients_computed_in_the_forward_pass_follow_the_upstream_gradient() -> None:
    # The fused loss forms its gradients while the chunk's logits are at hand; backward only scales them.
    hidden, weight, targets = random_problem(1, 9, 8, 20)
    reference = reference_loss(hidden, weight, targets, 0.1)
    expected = torch.autograd.grad(-2.5 * reference, [hidden, weight])
    fused = projected_cross_entropy(hidden, weight, targets, ignore_index=PAD_ID, label_smoothing=0.1, chunk_rows=4)
    for got, want in zip(torch.autograd.grad(-2.5 * fused, [hidden, weight]), expected):
        torch.testing.assert_close(got, want)


def test_loss_without_autograd_equals_the_training_loss() -> None:
    torch.manual_seed(2)
    hidden, weight = torch.randn(7, 8), nn.Parameter(torch.randn(20, 8))
    targets = torch.tensor([4, 9, PAD_ID, 1, 19, 3, PAD_ID])
    with torch.no_grad():
        value = projected_cross_entropy(hidden, weight, targets, ignore_index=PAD_ID, label_smoothing=0.1)
    assert not value.requires_grad and weight.grad is None
    reference = reference_loss(hidden, weight, targets, 0.1)
    torch.testing.assert_close(value, reference)


def test_bf16_matmuls_give_the_fp32_loss_and_gradients_to_bf16_precision() -> None:
    hidden, weight, targets = random_problem(3, 40, 16, 50)
    targets[::7] = PAD_ID
    kwargs = dict(ignore_index=PAD_ID, label_smoothing=0.1, chunk_rows=16)
    want = projected_cross_entropy(hidden, weight, targets, **kwargs)
    want_grads = torch.autograd.grad(want, [hidden, weight])
    got = projected_cross_entropy(hidden, weight, targets, compute_dtype=torch.bfloat16, **kwargs)
    got_grads = torch.autograd.grad(got, [hidden, weight])
    assert got.dtype == torch.float32 and [g.dtype for g in got_grads] == [torch.float32, torch.float32]
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0.0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.05)


def test_padding_rows_get_no_gradient() -> None:
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(12, 8)
    targets = torch.tensor([5, PAD_ID, 7, PAD_ID])
    projected_cross_entropy(hidden, weight, targets, ignore_index=PAD_ID, label_smoothing=0.1).backward()
    assert torch.count_nonzero(hidden.grad[[1, 3]]) == 0
    assert torch.count_nonzero(hidden.grad[[0, 2]]) > 0


def test_compiled_objective_gives_the_eager_loss_and_gradients_for_batches_of_different_shapes() -> None:
    from nmtkit.config import ModelConfig
    from nmtkit.loss import TrainingObjective
    from nmtkit.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, d_ff=32, n_enc_layers=1, n_dec_layers=1, dropout=0.0, max_positions=32)
    model = Transformer(cfg, 30, 30, is_joint_vocab=True)
    eager = TrainingObjective(model, 0.1, torch.float32)
    compiled = TrainingObjective(model, 0.1, torch.float32, compile=True)
    for B, S, T in [(3, 5, 4), (2, 7, 9), (4, 3, 6)]:  # (B, S, T) all change, as real batches do
        src = torch.randint(4, 30, (B, S))
        src[0, -2:] = PAD_ID
        tgt_in, tgt_out = torch.randint(4, 30, (B, T)), torch.randint(4, 30, (B, T))
        tgt_out[-1, -1] = PAD_ID
        results = []
        for objective in (eager, compiled):
            loss = objective(src, tgt_in, tgt_out)
            results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
        (want, want_grads), (got, got_grads) = results
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_chunk_gives_the_loss_and_gradients_of_cross_entropy_loss(dtype: torch.dtype, tolerance: float) -> None:
    """The GPU path of a compiled objective (`chunk_loss_and_grad` under torch.compile), checked here on CPU."""
    fused = torch.compile(chunk_loss_and_grad, dynamic=True)
    errors = fused_loss_errors(torch.device("cpu"), dtype, chunk_rows=32, fused_chunk=fused, size=(70, 16, 300))
    assert max(errors) < tolerance


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fp16_matmuls_give_the_loss_and_gradients_of_cross_entropy_loss(compiled: bool) -> None:
    """fp16 (GPUs without bf16) runs the same chunk loop, checked here on CPU, where torch runs fp16 matmuls too. The
    chunk's d loss / d logits is formed in fp16 before the grad scaler's factor arrives, but as the gradient of a
    summed loss it is (softmax - target) itself, as large as a scaled mean's: errors ~1e-3, 8x under bf16's."""
    fused = torch.compile(chunk_loss_and_grad, dynamic=True) if compiled else None
    errors = fused_loss_errors(torch.device("cpu"), torch.float16, chunk_rows=32, fused_chunk=fused, size=(70, 16, 300))
    assert max(errors) < 3e-3


def fused_loss_errors(device: torch.device, dtype: torch.dtype, size: tuple[int, int, int], **options) -> list[float]:
    """Relative errors of the fused loss, its hidden and its weight gradient on `device` against float64
    nn.CrossEntropyLoss on CPU, for a random (rows, d_model, vocabulary) problem with some padding."""
    hidden, weight, targets = random_problem(3, *size)
    targets[::5] = PAD_ID
    expected = reference_loss(hidden.double(), weight.double(), targets, 0.1)
    expected.backward()
    h, w = hidden.detach().to(device).requires_grad_(), weight.detach().to(device).requires_grad_()
    loss = projected_cross_entropy(h, w, targets.to(device), ignore_index=PAD_ID, label_smoothing=0.1, compute_dtype=dtype, **options)
    loss.backward()
    pairs = ((loss, expected), (h.grad, hidden.grad), (w.grad, weight.grad))
    return [float((got.detach().cpu().double() - want.detach()).norm() / want.detach().norm()) for got, want in pairs]


def test_second_derivative_is_refused_rather_than_silently_zero() -> None:
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(12, 8, requires_grad=True)
    loss = projected_cross_entropy(hidden, weight, torch.tensor([3, 4, 5, 6, 7]), ignore_index=PAD_ID, label_smoothing=0.1)
    (grad_h,) = torch.autograd.grad(loss, [hidden], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad_h.sum(), [hidden])

