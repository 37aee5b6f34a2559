"""fp32 CPU matmuls through oneDNN (cpu_matmul.py): the same values and gradients as torch's own ops, taken only
where they should be, and a choice of backend made by rule (where MKL would leave AVX-512 unused), or named by
NMTKIT_CPU_MATMUL, or refused clearly."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from nmtkit import cpu_matmul
from nmtkit.loss import projected_cross_entropy
from nmtkit.tokenizer import PAD_ID


@pytest.fixture
def onednn_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Force the oneDNN backend and record the strides of both operands of every product that takes it."""
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = cpu_matmul._onednn_linear

    def recording(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        calls.append((x.stride(), w.stride()))
        return real(x, w, b)

    monkeypatch.setattr(cpu_matmul, "_onednn_linear", recording)
    monkeypatch.setattr(cpu_matmul, "_chosen", "onednn")
    return calls


def test_onednn_linear_matches_torch_linear_in_value_and_gradients(onednn_calls: list) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16, requires_grad=True)
    layer = cpu_matmul.Linear(16, 24)
    y = layer(x)
    (gx, gw, gb) = torch.autograd.grad(y.square().sum(), [x, layer.weight, layer.bias])
    assert onednn_calls, "the oneDNN path was not taken"
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, layer.weight, layer.bias)
    want = torch.autograd.grad(y_ref.square().sum(), [x_ref, layer.weight, layer.bias])
    torch.testing.assert_close(y, y_ref)
    for got, expected in zip((gx, gw, gb), want):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("shape", [(40, 8, 32), (40, 32, 8)])  # the weight gradient formed either way round
def test_weight_gradient_product_equals_transposed_matmul_both_ways_round(onednn_calls: list, shape: tuple) -> None:
    k, m, n = shape
    a, b = torch.randn(k, m), torch.randn(k, n)
    torch.testing.assert_close(cpu_matmul.mm_tn(a, b), a.T @ b)
    torch.testing.assert_close(cpu_matmul.mm_nn(a.T.contiguous(), b), a.T @ b)
    assert len(onednn_calls) == 2


def test_a_second_derivative_through_the_onednn_linear_fails_loudly(onednn_calls: list) -> None:
    layer, x = cpu_matmul.Linear(4, 4), torch.randn(3, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        gx.sum().backward()


def test_empty_operands_take_torchs_op_which_handles_them(onednn_calls: list) -> None:
    # oneDNN refuses a product with a zero-sized side ("could not create a primitive descriptor")
    layer = cpu_matmul.Linear(8, 4)
    x = torch.randn(2, 0, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (2, 0, 4) and x.grad.shape == x.shape
    assert torch.equal(cpu_matmul.mm_tn(torch.randn(0, 3), torch.randn(0, 5)), torch.zeros(3, 5))
    assert onednn_calls == []


def test_bf16_autocast_and_blas_backend_use_torchs_own_linear(onednn_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    layer, x = cpu_matmul.Linear(8, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's bf16 op, not an fp32 product
    layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert onednn_calls == []
    monkeypatch.setattr(cpu_matmul, "_chosen", "blas")
    layer.float()(x)
    assert onednn_calls == []


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_loss_through_onednn_equals_the_blas_loss(monkeypatch: pytest.MonkeyPatch, smoothing: float) -> None:
    torch.manual_seed(1)
    hidden, weight = torch.randn(10, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(1, 20, (10,))
    targets[[1, 6]] = PAD_ID
    results = []
    for choice in ("blas", "onednn"):
        monkeypatch.setattr(cpu_matmul, "_chosen", choice)
        loss = projected_cross_entropy(hidden, weight, targets, ignore_index=PAD_ID, label_smoothing=smoothing, chunk_rows=3)
        results.append((loss, *torch.autograd.grad(loss, [hidden, weight])))
    for blas, onednn in zip(*results):
        torch.testing.assert_close(onednn, blas)


@pytest.mark.parametrize(
    ("vendor", "isa", "allocator", "expected"),
    [
        ("AuthenticAMD", "AVX512", "jemalloc", "onednn"),  # MKL would run its AVX2 code
        ("AuthenticAMD", "AVX512", "mimalloc", "onednn"),  # mimalloc keeps the heap from fragmenting too
        ("AuthenticAMD", "AVX512", "system malloc", "blas"),  # oneDNN's products fragment glibc's heap
        ("GenuineIntel", "AVX512", "jemalloc", "blas"),  # MKL has AVX-512 code for Intel CPUs
        ("AuthenticAMD", "AVX2", "jemalloc", "blas"),  # nothing to gain without AVX-512
        ("", "AVX512", "jemalloc", "blas"),  # vendor unknown: torch's default
    ],
)
def test_auto_takes_onednn_exactly_where_mkl_would_leave_avx512_unused_under_a_faster_malloc(
    monkeypatch: pytest.MonkeyPatch, vendor: str, isa: str, allocator: str, expected: str
) -> None:
    monkeypatch.delenv("NMTKIT_CPU_MATMUL", raising=False)
    monkeypatch.setattr(cpu_matmul, "_chosen", None)
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_matmul, "allocator_in_use", lambda: allocator)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    assert cpu_matmul.backend() == expected
    assert cpu_matmul.describe().startswith(expected) and isa in cpu_matmul.describe()


def test_output_of_the_onednn_linear_can_be_modified_in_place_like_nn_linear(onednn_calls: list) -> None:
    layer, x = cpu_matmul.Linear(8, 6), torch.randn(2, 3, 8, requires_grad=True)
    y = layer(x)
    y[..., 0].mul_(2)
    y.relu_()
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, layer.weight, layer.bias)
    y_ref[..., 0].mul_(2)
    y_ref.relu_().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert onednn_calls


def test_expanded_gradients_reach_onednn_as_contiguous_copies(onednn_calls: list) -> None:
    # the gradient of y.sum() is an expanded tensor (stride 0), which oneDNN reads ~1,000x slower as a weight operand
    layer, x = cpu_matmul.Linear(16, 32), torch.randn(40, 16)
    layer(x).sum().backward()
    assert all(0 not in stride for operands in onednn_calls for stride in operands)
    torch.testing.assert_close(layer.weight.grad, torch.ones(40, 32).T @ x)


def test_environment_names_the_backend_over_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rule() -> str:
        raise AssertionError("looked at the CPU although NMTKIT_CPU_MATMUL named the backend")

    monkeypatch.setattr(cpu_matmul, "cpu_vendor", no_rule)
    for choice in ("onednn", "blas"):
        monkeypatch.setattr(cpu_matmul, "_chosen", None)
        monkeypatch.setenv("NMTKIT_CPU_MATMUL", choice)
        assert cpu_matmul.backend() == choice
        assert "NMTKIT_CPU_MATMUL" in cpu_matmul.describe()


def test_unknown_backend_in_the_environment_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_matmul, "_chosen", None)
    monkeypatch.setenv("NMTKIT_CPU_MATMUL", "mkl")
    with pytest.raises(cpu_matmul.MatmulChoiceError, match=r"NMTKIT_CPU_MATMUL='mkl'.*auto, onednn, blas"):
        cpu_matmul.backend()


# -- weights packed for inference (PackedWeight) ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weight_gives_the_plain_products_and_fuses_the_relu(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.setattr(cpu_matmul, "_chosen", "onednn")
    torch.manual_seed(2)
    layer = cpu_matmul.Linear(32, 48).to(dtype).eval()
    x = torch.randn(5, 1, 32, dtype=dtype)  # a decoding step's (B, 1, D)
    with torch.no_grad():
        plain, plain_relu = layer(x), layer.relu(x)
        layer.pack()
        packed = layer.packed.product(x, layer.bias)
        assert packed is not None, "the packed path was not taken"
        torch.testing.assert_close(packed, plain)
        torch.testing.assert_close(layer(x), plain)
        torch.testing.assert_close(layer.relu(x), plain_relu)
        assert (layer.relu(x) >= 0).all() and (plain < 0).any()


def test_packed_weight_follows_in_place_updates_and_replacements_of_its_weight() -> None:
    torch.manual_seed(3)
    layer = cpu_matmul.Linear(16, 8).to(torch.bfloat16)
    layer.pack()
    x = torch.randn(4, 16, dtype=torch.bfloat16)

    def expect_fresh() -> None:
        with torch.no_grad():
            torch.testing.assert_close(layer.packed.product(x, layer.bias), F.linear(x, layer.weight, layer.bias))

    expect_fresh()
    with torch.no_grad():
        layer.weight.mul_(-2)  # an optimizer step changes the weight in place
    expect_fresh()
    layer.load_state_dict(cpu_matmul.Linear(16, 8).to(torch.bfloat16).state_dict())
    expect_fresh()
    layer.load_state_dict(cpu_matmul.Linear(16, 8).to(torch.bfloat16).state_dict(), assign=True)  # new Parameters
    expect_fresh()
    layer.weight = torch.nn.Parameter(torch.randn(8, 16, dtype=torch.bfloat16))
    expect_fresh()
    layer.float().to(torch.bfloat16)  # .to() replaces the weight's tensor
    expect_fresh()
    for _ in range(3):  # new tensors with no product in between: a freed address must not pass for the packed one
        layer.weight.data = torch.randn(8, 16, dtype=torch.bfloat16)
    expect_fresh()


def test_a_layer_made_under_inference_mode_is_not_packed_and_follows_in_place_changes() -> None:
    # tensors made under inference_mode have no version counter: a packed copy could not see an in-place change
    with torch.inference_mode():
        layer = cpu_matmul.Linear(16, 8).to(torch.bfloat16)
        layer.pack()
        x = torch.randn(4, 16, dtype=torch.bfloat16)
        assert layer.packed.product(x, layer.bias) is None
        layer.weight.mul_(-3)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_to_drops_the_packed_copy_and_the_next_product_packs_again() -> None:
    layer = cpu_matmul.Linear(16, 8).to(torch.bfloat16)
    layer.pack()
    assert layer.packed._state is not None
    layer.float().to(torch.bfloat16)
    assert layer.packed._state is None  # the old copy (and the storage it was made from) is not kept
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer.packed._state[4] is not None


def test_a_trainable_bias_of_a_packed_layer_gets_its_gradient() -> None:
    layer = cpu_matmul.Linear(8, 4).to(torch.bfloat16)
    layer.pack()
    layer.weight.requires_grad_(False)  # bias-only fine-tuning
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert layer.packed.product(x, layer.bias) is None
    layer(x).float().sum().backward()
    torch.testing.assert_close(layer.bias.grad.float(), torch.full((4,), 3.0))


def test_copies_of_a_packed_model_compute_alike_and_pack_their_own_weights() -> None:
    torch.manual_seed(4)
    layer = cpu_matmul.Linear(16, 8).to(torch.bfloat16)
    layer.pack()
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    for copy_ in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copy_.packed.owner is copy_ and copy_.packed is not layer.packed
        with torch.no_grad():
            copy_.weight.mul_(2)  # the copy's weight, not the original's
            torch.testing.assert_close(copy_(x), F.linear(x, copy_.weight, copy_.bias))
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    on_meta = copy.deepcopy(layer).to("meta")  # a copy off the CPU is not packed (oneDNN's reorder is CPU-only)
    assert on_meta(torch.randn(4, 16, dtype=torch.bfloat16, device="meta")).device.type == "meta"


def test_packed_weight_leaves_autograd_other_dtypes_and_the_blas_backend_to_the_plain_product(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu_matmul, "_chosen", "onednn")
    layer = cpu_matmul.Linear(8, 8)
    layer.pack()
    x = torch.randn(3, 8, requires_grad=True)
    assert layer.packed.product(x, layer.bias) is None  # autograd records: the plain path has a backward
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.packed.product(x, layer.bias) is None  # bf16 compute on fp32 weights: autocast's op
            assert layer(x).dtype == torch.bfloat16
        assert layer.packed.product(x.to(torch.float64), layer.bias) is None
        assert layer.packed.product(x[:0], layer.bias) is None
        monkeypatch.setattr(cpu_matmul, "_chosen", "blas")
        mkl = cpu_matmul.Linear(8, 8)
        mkl.pack()
        assert mkl.packed.product(x, mkl.bias) is None  # fp32 products stay with MKL where it was chosen
        assert mkl.packed._state[4] is None  # and no packed copy is kept for them
        bf16 = cpu_matmul.Linear(8, 8).to(torch.bfloat16)
        bf16.pack()
        assert bf16.packed.product(x.to(torch.bfloat16), bf16.bias) is not None  # bf16 products are oneDNN's anyway
