"""The Transformer's invariants: padding changes nothing real, no position sees the future,
and incremental decoding with the KV cache equals the full decoder pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmtkit import native
from nmtkit.config import ModelConfig
from nmtkit.model import Transformer, attend_one, attention, padding_mask, unpack_rows
from nmtkit.tokenizer import BOS_ID, PAD_ID

V = 50


def make_model(norm: str = "pre", tie: bool = True, joint: bool = True) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, n_enc_layers=2, n_dec_layers=2, dropout=0.0, norm=norm, tie_embeddings=tie, max_positions=64)
    return Transformer(cfg, V, V if joint else V + 7, joint).eval()


def random_ids(*shape: int) -> torch.Tensor:
    return torch.randint(4, V, shape)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_padding_does_not_change_outputs_of_real_tokens(norm: str) -> None:
    model = make_model(norm)
    src, tgt = random_ids(1, 7), random_ids(1, 5)
    src_padded = torch.cat([src, torch.full((1, 4), PAD_ID)], dim=1)
    tgt_padded = torch.cat([tgt, torch.full((1, 3), PAD_ID)], dim=1)
    with torch.no_grad():
        plain = model(src, tgt)
        padded = model(src_padded, tgt_padded)
    torch.testing.assert_close(padded[:, :5], plain, atol=1e-5, rtol=1e-5)


def test_attention_kernels_sdpa_and_matmul_give_the_same_logits_and_gradients(monkeypatch) -> None:
    # train.attention_kernel chooses how attention is computed, never what: same weights, same numbers
    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, n_enc_layers=2, n_dec_layers=2, dropout=0.0, max_positions=64)
    models = {kernel: Transformer(cfg, V, V, True, attention_kernel=kernel) for kernel in ("sdpa", "matmul")}
    models["matmul"].load_state_dict(models["sdpa"].state_dict())
    src, tgt = random_ids(3, 9), random_ids(3, 7)
    src[0, -4:] = PAD_ID
    tgt[1, -2:] = PAD_ID
    results = {}
    for kernel, model in models.items():
        sdpa_calls.clear()
        logits = model(src, tgt)
        results[kernel] = (logits, torch.autograd.grad(logits.square().sum(), list(model.parameters())))
        assert len(sdpa_calls) == (6 if kernel == "sdpa" else 0)  # 2 encoder + 2 x 2 decoder attentions, on this CPU too
    torch.testing.assert_close(results["matmul"][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
    for got, want in zip(results["matmul"][1], results["sdpa"][1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_model_loaded_for_translation_uses_the_default_attention_kernel_whatever_the_run_trained_with(trained_run) -> None:
    from nmtkit.translator import Translator, build_model

    loaded = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    loaded.cfg.train.attention_kernel = "sdpa"  # as if the run had trained with it
    kernels = lambda model: {m.kernel for m in model.modules() if hasattr(m, "kernel")}  # noqa: E731
    assert kernels(build_model(loaded.cfg, loaded.tokenizer)) == {"auto"}
    assert kernels(build_model(loaded.cfg, loaded.tokenizer, loaded.cfg.train.attention_kernel)) == {"sdpa"}  # training's call


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_packed_encoder_layers_give_the_padded_layers_outputs_and_gradients_at_real_positions(norm: str) -> None:
    """On CPU the encoder skips padding by running its layers on packed rows (Transformer.encode); GPUs run
    the same layers padded. Both give the same memory where there are tokens, and the same gradients."""
    model = make_model(norm)
    src = random_ids(3, 8)
    src[0, 5:] = PAD_ID
    src[2, 2:] = PAD_ID
    mask = padding_mask(src)
    rows = mask.flatten().nonzero().squeeze(1)
    x = model._embed(model.src_embed, src)
    padded = x.detach().requires_grad_()
    packed = x.detach().flatten(0, 1).index_select(0, rows).requires_grad_()
    y_padded, y_packed = padded, packed
    for layer in model.encoder:
        y_padded, y_packed = layer(y_padded, mask), layer(y_packed, mask, rows)
    real = mask[:, 0, 0, :, None]
    torch.testing.assert_close(unpack_rows(y_packed, rows, 3, 8), y_padded * real, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(y_padded) * real  # an upstream gradient at real positions only
    (y_padded * weights).sum().backward()
    (y_packed * weights.flatten(0, 1).index_select(0, rows)).sum().backward()
    torch.testing.assert_close(packed.grad, padded.grad.flatten(0, 1).index_select(0, rows), atol=1e-5, rtol=1e-5)


def test_encode_with_a_mask_that_broadcasts_over_the_batch_encodes_every_sentence() -> None:
    model = make_model()
    src = random_ids(3, 6)  # no padding: an all-true (1, 1, 1, S) mask means the same as padding_mask(src)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(src, torch.ones(1, 1, 1, 6, dtype=torch.bool)), model.encode(src, padding_mask(src)))


def test_padding_in_a_batch_matches_each_sentence_alone() -> None:
    model = make_model()
    a, b = random_ids(1, 9), random_ids(1, 4)
    batch = torch.full((2, 9), PAD_ID)
    batch[0], batch[1, :4] = a[0], b[0]
    tgt = random_ids(2, 6)
    with torch.no_grad():
        together = model(batch, tgt)
        alone = model(b, tgt[1:])
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=1e-5)


def test_no_position_attends_to_the_future() -> None:
    model = make_model()
    src, tgt = random_ids(1, 6), random_ids(1, 8)
    changed = tgt.clone()
    changed[0, 5:] = random_ids(3)
    with torch.no_grad():
        before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_kv_cached_steps_equal_the_full_decoder_pass(norm: str) -> None:
    model = make_model(norm)
    src = random_ids(3, 7)
    src[2, 4:] = PAD_ID
    tgt = torch.cat([torch.full((3, 1), BOS_ID), random_ids(3, 9)], dim=1)
    with torch.no_grad():
        src_mask = padding_mask(src)
        memory = model.encode(src, src_mask)
        full = model.project(model.decode(memory, src_mask, tgt))  # (B, T, V)
        cache = model.start_cache(memory, src_mask, max_len=tgt.size(1))
        steps = [model.project(model.decode_step(tgt[:, t : t + 1], cache)) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_equals_sdpa_in_values_and_gradients(causal: bool) -> None:
    torch.manual_seed(4)
    q, k, v = (torch.randn(3, 2, 6, 8, requires_grad=True) for _ in range(3))
    mask = padding_mask(torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, PAD_ID, PAD_ID], [5, 6, 7, PAD_ID, PAD_ID, PAD_ID]]))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False) if not causal else (
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask & torch.ones(6, 6, dtype=torch.bool).tril())
    )
    got = attention(q, k, v, mask, is_causal=causal)
    torch.testing.assert_close(got, want)
    grads_want = torch.autograd.grad(want.square().sum(), [q, k, v])
    grads_got = torch.autograd.grad(got.square().sum(), [q, k, v])
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w)


def test_cpu_attention_in_bf16_stays_bf16_and_close_to_fp32() -> None:
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), attention(q, k, v, is_causal=True), rtol=0.05, atol=0.03)


def test_joint_vocabulary_ties_source_target_and_output_embeddings() -> None:
    model = make_model(tie=True, joint=True)
    assert model.src_embed is model.tgt_embed and model.output is None
    names = [n for n, _ in model.named_parameters()]
    assert sum("embed" in n for n in names) == 1


def test_separate_vocabularies_tie_only_target_and_output() -> None:
    model = make_model(tie=True, joint=False)
    assert model.src_embed is not model.tgt_embed
    assert model.project(torch.zeros(1, 32)).shape == (1, V + 7)


def test_untied_model_has_its_own_output_layer() -> None:
    model = make_model(tie=False)
    assert model.output is not None and model.output.weight is not model.tgt_embed.weight


def test_too_long_input_raises_a_clear_error() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="max_positions"):
        model(random_ids(1, 65), random_ids(1, 3))


def native_kernels() -> native.Kernels:
    """nmtkit's native kernels, or a skip where they can't be built here (decoding then runs torch ops alone)."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("nmtkit's native kernels could not be built here (see the log): the torch path is tested alone")
    return kernels


@pytest.fixture
def one_thread():
    """The attention kernel runs where torch runs one thread (each decoding worker does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def keys_and_values(layout: str, B: int, H: int, L: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) keys and values as decoding reads them: views of the position-major cache, or the memory's own."""
    if layout == "cache":
        return torch.randn(L + 3, B, H, D)[:L].permute(1, 2, 0, 3), torch.randn(L + 3, B, H, D)[:L].permute(1, 2, 0, 3)
    return torch.randn(B, H, L, D), torch.randn(B, H, L, D)


@pytest.mark.parametrize("layout", ["cache", "memory"])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_rows", [0, 1, 5])  # no mask, one row for all sentences, one per sentence
def test_native_attention_of_one_query_equals_torch_ops(monkeypatch, one_thread, layout: str, q_dtype: torch.dtype, bias_rows: int) -> None:
    kernels = native_kernels()
    torch.manual_seed(bias_rows)
    B, H, L, D = 5, 4, 7, 16
    keys, values = keys_and_values(layout, B, H, L, D)
    q = (torch.randn(B, H, 1, D) * 3).to(q_dtype)
    bias = None
    if bias_rows:
        bias = torch.zeros(bias_rows, 1, 1, L)
        bias[0, ..., 4:] = float("-inf")  # padding of the first (or every) source
    got = kernels.attend_one(q, keys, values, bias)
    assert got is not None and got.dtype == q_dtype and got.shape == (B, H, 1, D)
    assert attend_one(q, keys, values, bias) is not None  # the model's attend_one takes the kernel's path
    monkeypatch.setattr(native, "kernels", lambda: None)
    want = attend_one(q, keys, values, bias)
    tolerance = 1e-5 if q_dtype == torch.float32 else 1e-2  # bf16 outputs: one rounding of fp32 results
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("layout", ["cache", "memory"])
def test_native_attention_over_bf16_caches_equals_the_same_values_in_fp32(one_thread, layout: str) -> None:
    """bf16 caches hold the bf16 projections' keys and values exactly; the kernel widens them exactly as it reads."""
    kernels = native_kernels()
    torch.manual_seed(12)
    B, H, L, D = 5, 4, 9, 16
    keys, values = (t.bfloat16() for t in keys_and_values(layout, B, H, L, D))
    q = torch.randn(B, H, 1, D)  # fp32 output: no bf16 rounding to hide a difference (the sums' order may differ)
    bias = torch.zeros(B, 1, 1, L)
    bias[2, ..., 6:] = float("-inf")
    got = kernels.attend_one(q, keys, values, bias)
    want = kernels.attend_one(q, keys.float(), values.float(), bias)
    assert got is not None and want is not None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_decoding_caches_are_bf16_only_where_the_attention_kernel_reads_them(monkeypatch, one_thread) -> None:
    native_kernels()  # (without them the caches stay fp32)
    bf16, fp32 = torch.bfloat16, torch.float32
    with torch.no_grad():  # as decoding runs
        assert native.cpu_cache_dtype(bf16) == bf16 and native.cpu_cache_dtype(fp32) == fp32
    torch.set_num_threads(2)  # torch's batched matmuls then attend, and they are fast over fp32 only
    assert native.cpu_cache_dtype(bf16) == fp32
    torch.set_num_threads(1)
    with torch.enable_grad():  # the kernel records no graph: torch's ops attend, over fp32
        assert native.cpu_cache_dtype(bf16) == fp32
    with torch.no_grad():
        assert native.cpu_cache_dtype(bf16) == bf16
    model = make_model().to(bf16)
    memory, mask = torch.randn(2, 5, 32).to(bf16), torch.ones(2, 1, 1, 5, dtype=torch.bool)
    with torch.no_grad():
        cache = model.start_cache(memory, mask, 4)
    assert cache.keys.dtype == bf16 and cache.memory_bias is not None and cache.memory_bias.dtype == fp32
    monkeypatch.setattr(native, "kernels", lambda: None)
    with torch.no_grad():
        assert native.cpu_cache_dtype(bf16) == fp32 and model.start_cache(memory, mask, 4).keys.dtype == fp32


def test_native_attention_hands_back_what_it_does_not_take_and_gives_nan_like_softmax(one_thread) -> None:
    kernels = native_kernels()
    B, H, L, D = 2, 2, 3, 8
    keys, values = keys_and_values("memory", B, H, L, D)
    q = torch.randn(B, H, 1, D)
    assert kernels.attend_one(q, keys.bfloat16(), values) is None  # keys and values of two dtypes: torch's path
    assert kernels.attend_one(q, keys, values.transpose(2, 3).contiguous().transpose(2, 3)) is None  # other strides
    assert kernels.attend_one(torch.randn(B, H, 2, D), keys, values) is None  # two queries
    assert kernels.attend_one(q, keys, values.to("meta")) is None and kernels.attend_one(q, keys, values, torch.zeros(B, 1, 1, L, device="meta")) is None
    assert kernels.attend_one(q.requires_grad_(), keys, values) is None  # autograd: torch's ops record the graph
    q = q.detach()
    huge = torch.randn(1, 1, 1, 1).expand(1, 1, 2**40, 1)  # 2^40 scores would not fit the kernel's scratch
    assert kernels.attend_one(torch.randn(1, 1, 1, 1), huge, huge) is None
    torch.set_num_threads(2)  # torch's batched matmuls spread over both threads; the kernel would run on one
    assert kernels.attend_one(q, keys, values) is None
    assert kernels.attend_one(q, keys.bfloat16(), values.bfloat16()) is not None  # but over bf16 caches it is faster
    torch.set_num_threads(1)
    hidden = torch.zeros(B, 1, 1, L)
    hidden[1] = float("-inf")  # every key of sentence 1 hidden: NaN, as softmax over -inf gives
    out = kernels.attend_one(q, keys, values, hidden)
    assert out is not None and out[0].isfinite().all() and out[1].isnan().all()
