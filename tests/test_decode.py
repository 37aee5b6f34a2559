"""Greedy decoding and its per-token log: cached decoding equals re-running the full decoder,
probabilities equal the softmax of a full forward pass, losses equal CrossEntropyLoss, entropy
equals −Σ p log p."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from nmtkit import cpu_matmul, native
from nmtkit.beam import beam_search
from nmtkit.cpu_matmul import PackedWeight
from nmtkit.decode import TorchStepStats, block_argmax, block_topk, greedy_decode, max_new_tokens, score_reference
from nmtkit.device import choose_runtime, for_inference
from nmtkit.kv_cache import KVCache
from nmtkit.model import padding_mask
from nmtkit.tokenizer import BOS_ID, EOS_ID, PAD_ID
from test_model import make_model, native_kernels, random_ids


def uncached_greedy(model, src: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding the slow way: re-run the whole decoder on the prefix at every step."""
    src_mask = padding_mask(src)
    memory = model.encode(src, src_mask)
    prefix = torch.full((src.size(0), 1), BOS_ID)
    probs = []
    for _ in range(n_steps):
        logits = model.project(model.decode(memory, src_mask, prefix))[:, -1]
        p = logits.softmax(-1)
        nxt = p.argmax(-1)
        probs.append(p.gather(1, nxt[:, None])[:, 0])
        prefix = torch.cat([prefix, nxt[:, None]], dim=1)
    return prefix[:, 1:], torch.stack(probs, dim=1)


def test_cached_greedy_gives_the_same_tokens_and_probabilities_as_rerunning_the_decoder() -> None:
    model = make_model()
    src = random_ids(4, 9)
    src[1, 6:] = PAD_ID
    with torch.no_grad():
        fast = greedy_decode(model, src, 12, top_k=3, stop_at_eos=False)
        slow_tokens, slow_probs = uncached_greedy(model, src, 12)
    assert torch.equal(fast.tokens, slow_tokens)
    torch.testing.assert_close(fast.probs, slow_probs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_static_cache_steps_give_the_tokens_and_probabilities_of_the_growing_cache(stop_at_eos: bool) -> None:
    """The fixed-shape steps that CUDA graphs replay (here run eagerly) attend to every slot with a bias
    hiding the unwritten ones: the same translation and per-token log as attending to the written ones."""
    model = make_model()
    src = random_ids(5, 9)
    src[1, 6:] = PAD_ID
    with torch.no_grad():
        growing = greedy_decode(model, src, 12, top_k=3, stop_at_eos=stop_at_eos)
        static = greedy_decode(model, src, 12, top_k=3, stop_at_eos=stop_at_eos, static=True)
    assert torch.equal(static.tokens, growing.tokens) and torch.equal(static.lengths, growing.lengths)
    for name in ("probs", "entropy", "top_probs"):
        torch.testing.assert_close(getattr(static, name), getattr(growing, name), atol=1e-5, rtol=1e-5)


def test_turning_the_per_token_log_on_does_not_change_the_translation() -> None:
    # with the log on, the next token is the first of the top-k instead of a separate argmax
    model = make_model()
    src = random_ids(6, 9)
    src[2, 5:] = PAD_ID
    with torch.no_grad():
        plain = greedy_decode(model, src, 10)
        logged = greedy_decode(model, src, 10, top_k=4)
    assert torch.equal(plain.tokens, logged.tokens)
    assert torch.equal(plain.lengths, logged.lengths)


def test_recorded_probabilities_match_the_softmax_of_a_full_forward_pass() -> None:
    model = make_model()
    src = random_ids(2, 6)
    with torch.no_grad():
        out = greedy_decode(model, src, 8, top_k=5, stop_at_eos=False)
        tgt_in = torch.cat([torch.full((2, 1), BOS_ID), out.tokens[:, :-1]], dim=1)
        probs = model(src, tgt_in).softmax(-1)  # (B, T, V)
    chosen = probs.gather(-1, out.tokens[..., None])[..., 0]
    torch.testing.assert_close(out.probs, chosen, atol=1e-5, rtol=1e-5)
    top_probs, top_ids = probs.topk(5, dim=-1)
    assert torch.equal(out.top_ids, top_ids)
    torch.testing.assert_close(out.top_probs, top_probs, atol=1e-5, rtol=1e-5)
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(out.entropy, entropy, atol=1e-4, rtol=1e-4)


def test_a_forced_eos_whose_probability_underflows_reports_its_true_loss() -> None:
    """At the length budget EOS is chosen whatever its probability. Where that probability underflows fp32 (here EOS's
    logit is thousands below the rest), its loss is still -ln p from the log-probability, not a capped stand-in."""
    model = make_model()
    src = random_ids(2, 5)
    with torch.no_grad():
        model.dec_norm.weight.zero_()
        model.dec_norm.bias.fill_(1.0)  # every hidden state is all ones
        model.tgt_embed.weight[EOS_ID] = -100.0  # so EOS's logit is -100 * d_model
        greedy = greedy_decode(model, src, 3, top_k=2)  # the budget forces EOS at the third step
        beam = beam_search(model, src, 3, beam_size=2, top_k=2).rank(0)
        for out in (greedy, beam):
            assert (out.tokens[:, -1] == EOS_ID).all() and (out.probs[:, -1] == 0.0).all()
            tgt_in = torch.cat([torch.full((2, 1), BOS_ID), out.tokens[:, :-1]], dim=1)
            logp = model(src, tgt_in).float().log_softmax(-1)
            want = -logp.gather(-1, out.tokens[..., None])[..., 0]
            assert (want[:, -1] > 1000).all()
            torch.testing.assert_close(out.losses, want, atol=1e-3, rtol=1e-5)


def test_greedy_stops_at_eos_and_pads_after_it() -> None:
    model = make_model()
    with torch.no_grad():  # make EOS the argmax everywhere after the first step by biasing its embedding row
        model.tgt_embed.weight[EOS_ID] += 5 * model.dec_norm.weight.sign()
    out = greedy_decode(model, random_ids(3, 5), 20)
    for row, n in zip(out.tokens, out.lengths):
        assert row[n - 1] == EOS_ID
        assert (row[n:] == PAD_ID).all()


def test_every_output_ends_within_its_length_budget() -> None:
    model = make_model()
    src = random_ids(3, 10)
    src[0, 2:] = PAD_ID
    budget = max_new_tokens(src, a=1.0, b=2, limit=64)
    assert budget.tolist() == [4, 12, 12]
    out = greedy_decode(model, src, budget)
    assert (out.lengths <= budget).all()
    assert all(row[n - 1] == EOS_ID for row, n in zip(out.tokens, out.lengths))


def test_reference_losses_average_to_cross_entropy_loss() -> None:
    model = make_model()
    src = random_ids(2, 7)
    tgt_out = random_ids(2, 6)
    tgt_out[1, 4:] = PAD_ID
    tgt_out[0, -1], tgt_out[1, 3] = EOS_ID, EOS_ID
    tgt_in = torch.cat([torch.full((2, 1), BOS_ID), tgt_out[:, :-1]], dim=1).masked_fill(tgt_out == PAD_ID, PAD_ID)
    scores = score_reference(model, src, tgt_in, tgt_out)
    with torch.no_grad():
        logits = model(src, tgt_in)  # an independent full forward pass, not the function's own logits
    expected = nn.CrossEntropyLoss(ignore_index=PAD_ID)(logits.flatten(0, 1), tgt_out.flatten())
    mean = scores.losses[scores.mask].mean()
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(scores.probs[scores.mask], (-scores.losses[scores.mask]).exp())


def stats_of(logits: torch.Tensor, k: int, kind: str = "torch") -> tuple[torch.Tensor, ...]:
    """(values, ids, ln Z, entropy) of a decoding step's logits through TorchStepStats or nmtkit's kernel."""
    B, V = logits.shape
    values, ids, log_z, entropy = torch.empty(B, k), torch.empty(B, k, dtype=torch.long), torch.empty(B), torch.empty(B)
    stats = TorchStepStats() if kind == "torch" else native_kernel()
    stats(logits, values, ids, log_z, entropy, **({} if kind == "torch" else {"scratch": torch.empty(V)}))
    return values, ids, log_z, entropy


def native_kernel() -> native.DecodeStats:
    return native_kernels().decode_stats


STATS_KINDS = ["torch", "native"]


@pytest.mark.parametrize("kind", STATS_KINDS)
def test_entropy_matches_the_coin_examples(kind: str) -> None:
    for p_heads, bits in [(0.488, 0.9996), (0.177, 0.6735)]:
        logits = torch.tensor([[math.log(p_heads), math.log(1 - p_heads)]])
        _, _, log_z, entropy = stats_of(logits, 2, kind)
        assert abs(entropy.item() / math.log(2) - bits) < 1e-4
        assert abs(log_z.item()) < 1e-6  # the logits were log-probabilities already


@pytest.mark.parametrize("kind", STATS_KINDS)
def test_step_stats_stay_fp32_under_bf16_autocast(kind: str) -> None:
    # Decoding runs under autocast; the per-token statistics must not be rounded to bf16 on the way.
    torch.manual_seed(7)
    logits = torch.randn(8, 3000) * 4
    want = stats_of(logits, 5, kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = stats_of(logits, 5, kind)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.dtype in (torch.float32, torch.long)
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [8000, 1000, 37])  # 37: no whole chunk of the kernel, only its tail loop
@pytest.mark.parametrize("kind", STATS_KINDS)
def test_step_stats_equal_float64_softmax_statistics(kind: str, vocab: int, dtype: torch.dtype) -> None:
    torch.manual_seed(vocab)
    logits = (torch.randn(16, vocab) * 4).to(dtype)
    logits[0, 5] = 40.0  # one row sure of itself: p ~ 1, entropy ~ 0
    logits[1] = logits[1] * 20  # logits ~100 apart: terms below e^-87 in the sums
    x = logits.double()
    for k in (1, 5):
        values, ids, log_z, entropy = stats_of(logits, k, kind)
        assert torch.equal(values.double(), x.topk(k, dim=-1).values)  # (bf16 has ties: their order is free)
        assert torch.equal(x.gather(1, ids), values.double()) and all(len(set(row)) == k for row in ids.tolist())
        assert torch.equal(ids[:, 0], x.argmax(dim=-1))  # the first of tied maxima (bf16 ties), as argmax
        torch.testing.assert_close(log_z.double(), x.logsumexp(dim=-1), rtol=1e-6, atol=1e-6)
        p = x.softmax(dim=-1)
        # torch's ln Z - p . x sums 8,000 fp32 products of size ~|x| and cancels (up to 2.4e-5 nats off here);
        # the kernel sums p (x - m), which is small where p is large (1.3e-6)
        tolerance = 5e-5 if kind == "torch" else 5e-6
        assert ((entropy.double() - -(p * p.clamp_min(1e-300).log()).sum(dim=-1)).abs() <= tolerance).all()


@pytest.mark.parametrize("kind", STATS_KINDS)
def test_tied_top_logits_choose_the_lower_id_with_the_log_on_or_off(kind: str) -> None:
    """bf16 logits tie often; the chosen token must not depend on whether the per-token log is on."""
    torch.manual_seed(4)
    logits = torch.randn(8, 8000)
    logits[:, [7000, 4100, 130]] = 9.0  # three-way tie at the top, in blocks of the kernel and of block_topk
    logits[::2, 4100] = 9.5  # even rows: no tie at the top, a two-way tie below it
    stats = TorchStepStats() if kind == "torch" else functools.partial(native_kernel(), scratch=torch.empty(8000))
    argmax = torch.empty(8, 1, dtype=torch.long)
    stats(logits, torch.empty(8, 1), argmax)
    values, ids, _, _ = stats_of(logits, 5, kind)
    assert argmax[:, 0].tolist() == ids[:, 0].tolist() == [4100, 130] * 4
    assert ids[1, :3].tolist() == [130, 4100, 7000] and ids[0, :3].tolist() == [4100, 130, 7000]


@pytest.mark.parametrize("vocab", [8000, 37])
@pytest.mark.parametrize("kind", STATS_KINDS)
def test_more_ties_at_the_top_than_k_still_lead_with_the_argmax(kind: str, vocab: int) -> None:
    torch.manual_seed(5)
    logits = torch.randn(64, vocab)
    for row in logits:
        row[torch.randperm(vocab)[:7]] = 9.0  # a seven-way tie at the top, with k = 5
    values, ids, _, _ = stats_of(logits, 5, kind)
    assert torch.equal(ids[:, 0], logits.argmax(dim=-1)) and (values == 9.0).all()
    assert all(len(set(row)) == 5 for row in ids.tolist())


@pytest.mark.parametrize("kind", STATS_KINDS)
def test_a_logit_of_minus_infinity_leaves_the_entropy_finite(kind: str) -> None:
    """A token the model rules out entirely (logit -inf, as a mask gives) has p = 0 and adds nothing to the entropy."""
    torch.manual_seed(4)
    logits = torch.randn(4, 1000)
    logits[:, 17] = float("-inf")
    _, _, log_z, entropy = stats_of(logits, 5, kind)
    p = logits.double().softmax(-1)
    want = -(p * p.log()).nan_to_num().sum(-1)
    torch.testing.assert_close(entropy.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(log_z.double(), logits.double().logsumexp(-1), atol=1e-4, rtol=1e-6)


def test_native_kernel_takes_the_lower_id_on_ties_and_survives_nan_and_inf() -> None:
    torch.manual_seed(3)
    tied = torch.randint(0, 5, (16, 8000)).float()  # many equal maxima
    values, ids, _, _ = stats_of(tied, 1, "native")
    assert torch.equal(ids[:, 0], tied.argmax(dim=-1))  # torch's argmax returns the first maximum
    values, ids, _, _ = stats_of(tied, 5, "native")
    assert (values == 4).all() and torch.equal(ids, torch.stack([row.nonzero()[:5, 0] for row in tied == 4]))
    odd = torch.randn(3, 1000)
    odd[0] = float("nan")
    odd[1, :500] = float("-inf")  # logits a model has masked: no inf or NaN in the statistics
    values, ids, log_z, entropy = stats_of(odd, 5, "native")
    assert ((ids >= 0) & (ids < 1000)).all()  # ids are safe to gather with, even for a row of NaNs
    assert math.isfinite(entropy[1].item()) and math.isfinite(log_z[1].item())
    assert math.isclose(log_z[1].item(), odd[1].double().logsumexp(0).item(), rel_tol=1e-6)
    sparse = torch.full((2, 300), float("-inf"))
    sparse[0, 1] = 5.0  # one finite logit, k = 3: the rest get the lowest free ids, never a repeat
    _, ids, _, _ = stats_of(sparse, 3, "native")
    assert ids.tolist() == [[1, 0, 2], [0, 1, 2]]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_greedy_decode_with_the_native_kernels_equals_torch_ops(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    native_kernel()
    real_attend, attended = native.AttendOne.__call__, []

    def counting(self, *args):
        out = real_attend(self, *args)
        attended.append(out is not None)
        return out

    monkeypatch.setattr(native.AttendOne, "__call__", counting)
    runtime = choose_runtime("cpu", precision)
    model = for_inference(make_model(), runtime)
    src = random_ids(6, 9)
    src[1, 6:] = PAD_ID
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a decoding worker, where the attention kernel runs too
    try:
        with runtime.compute():
            fast = greedy_decode(model, src, 12, top_k=4)
            fast_plain = greedy_decode(model, src, 12)
            monkeypatch.setattr(native, "kernels", lambda: None)
            want = greedy_decode(model, src, 12, top_k=4)
            want_plain = greedy_decode(model, src, 12)
    finally:
        torch.set_num_threads(threads)
    assert attended and all(attended), "a step's attention left the kernel"
    assert torch.equal(fast.tokens, want.tokens) and torch.equal(fast_plain.tokens, want_plain.tokens)
    assert torch.equal(fast.lengths, want.lengths) and torch.equal(fast.top_ids[..., 0], want.top_ids[..., 0])
    if precision == "fp32":  # bf16 logits tie among the alternatives, whose order torch's topk leaves free
        assert torch.equal(fast.top_ids, want.top_ids)
    for name in ("probs", "entropy", "top_probs"):
        torch.testing.assert_close(getattr(fast, name), getattr(want, name), rtol=1e-5, atol=1e-6)


def test_static_cache_steps_in_bf16_on_cpu_write_the_fp32_cache() -> None:
    """bf16 steps on CPU keep their keys and values in fp32 caches; the static path converts as the dynamic one does."""
    runtime = choose_runtime("cpu", "bf16")
    model = for_inference(make_model(), runtime)
    src = random_ids(3, 7)
    with runtime.compute():
        growing = greedy_decode(model, src, 8, stop_at_eos=False)
        static = greedy_decode(model, src, 8, stop_at_eos=False, static=True)
    assert torch.equal(static.tokens, growing.tokens)


def test_fp16_logits_on_cpu_decode_with_torch_ops_beside_the_kernels() -> None:
    """The kernels take fp32 and bf16 logits; an fp16 model (Python API only: the CLI refuses fp16 on CPU) still decodes."""
    model = make_model().half().eval()
    out = greedy_decode(model, random_ids(3, 7), 6, top_k=3)
    assert out.probs is not None and out.probs.dtype == torch.float32 and (out.probs > 0).all()


@pytest.mark.parametrize("vocab", [8000, 4096, 1000])  # 1000 is no multiple of the block: plain topk/argmax
def test_block_argmax_and_topk_equal_torch_including_ties(vocab: int) -> None:
    torch.manual_seed(6)
    logits = torch.randn(16, vocab)
    tied = torch.randint(0, 5, (16, vocab)).float()  # many equal maxima: the first index must win
    for x in (logits, tied):
        assert torch.equal(block_argmax(x), x.argmax(dim=-1))
    values, ids = block_topk(logits, 5)
    want_values, want_ids = logits.topk(5, dim=-1)
    assert torch.equal(values, want_values) and torch.equal(ids, want_ids)
    tied_values, tied_ids = block_topk(tied, 5)
    assert torch.equal(tied_values, tied.topk(5, dim=-1).values)
    assert torch.equal(tied.gather(1, tied_ids), tied_values)  # the ids point at those values


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("tie", [True, False])
def test_weights_packed_for_cpu_decode_like_the_plain_weights(monkeypatch: pytest.MonkeyPatch, precision: str, tie: bool) -> None:
    monkeypatch.setattr(cpu_matmul, "_chosen", "onednn")
    packed_products = []
    real = PackedWeight.product

    def counting(self, *args, **kwargs):
        y = real(self, *args, **kwargs)
        packed_products.append(y is not None)
        return y

    monkeypatch.setattr(PackedWeight, "product", counting)
    runtime = choose_runtime("cpu", precision)
    model = make_model(tie=tie)
    packed = for_inference(copy.deepcopy(model), runtime)  # packs on CPU
    plain = copy.deepcopy(model).to(runtime.dtype).eval()
    assert packed.output_packed is not None and plain.output_packed is None
    src = random_ids(4, 9)
    src[1, 6:] = PAD_ID
    with runtime.compute():
        want = greedy_decode(plain, src, 10, top_k=3, stop_at_eos=False)
        want_beam = beam_search(plain, src, 10, beam_size=3)
        assert packed_products == []
        got = greedy_decode(packed, src, 10, top_k=3, stop_at_eos=False)
        got_beam = beam_search(packed, src, 10, beam_size=3)
    assert packed_products and all(packed_products), "a product of the packed model left the packed path"
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got_beam.tokens, want_beam.tokens)
    torch.testing.assert_close(got.probs, want.probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_beam.scores, want_beam.scores, atol=1e-5, rtol=1e-5)


def test_kv_cache_returns_what_was_appended_from_one_gapless_block() -> None:
    cache = KVCache(n_layers=2, batch=3, n_heads=4, max_len=10, head_dim=8, device=torch.device("cpu"), dtype=torch.float32)
    written = [torch.randn(3, 4, 1, 8) for _ in range(3)]
    for k in written:
        keys, values = cache.append(1, k, -k)
        cache.advance()
    assert torch.equal(keys, torch.cat(written, dim=2)) and torch.equal(values, -keys)  # (B, H, t, Dh)
    assert keys.permute(2, 0, 1, 3).is_contiguous()  # the written positions: one block, no unwritten slots inside


def test_kv_cache_reorder_moves_the_written_positions_and_leaves_the_memory_when_asked() -> None:
    cache = KVCache(n_layers=2, batch=3, n_heads=4, max_len=10, head_dim=8, device=torch.device("cpu"), dtype=torch.float32)
    memory = (torch.randn(3, 4, 5, 8), torch.randn(3, 4, 5, 8))
    cache.memory_kv = [memory, memory]
    cache.memory_bias = torch.zeros(3, 1, 1, 5)
    written = [torch.randn(3, 4, 1, 8) for _ in range(4)]
    for k in written:
        for layer in (0, 1):
            cache.append(layer, k + layer, -k)
        cache.advance()
    index = torch.tensor([2, 2, 0, 1])  # a row twice, one dropped: B' = 4
    cache.reorder(index, memory=False)
    assert cache.memory_kv[0] is memory and cache.memory_bias.size(0) == 3  # left as they were
    for layer in (0, 1):
        keys, values = cache.append(layer, torch.zeros(4, 4, 1, 8), torch.zeros(4, 4, 1, 8))
        want = torch.cat(written, dim=2).index_select(0, index)
        assert torch.equal(keys[:, :, :4], want + layer) and torch.equal(values[:, :, :4], -want)
    cache.reorder(torch.tensor([2, 0]))  # memory=True: the cross-attention rows follow too
    assert cache.memory_kv[0][0].size(0) == 2 and torch.equal(cache.memory_kv[0][0][0], memory[0][2])
    assert cache.memory_bias is not None and cache.memory_bias.size(0) == 2


@pytest.mark.parametrize("tie", [True, False])
def test_packed_output_projection_follows_a_replaced_output_layer_or_embedding(tie: bool) -> None:
    model = for_inference(make_model(tie=tie), choose_runtime("cpu", "bf16"))
    hidden = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        model.project(hidden)  # the packed copy is in use
        if tie:
            model.tgt_embed = model.src_embed = nn.Embedding(model.tgt_vocab_size, 32).to(torch.bfloat16)
        else:
            model.output = nn.Linear(32, model.tgt_vocab_size, bias=False).to(torch.bfloat16)
        torch.testing.assert_close(model.project(hidden), hidden @ model.output_weight.T)

