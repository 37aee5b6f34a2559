"""Token-budget batching: budget, coverage, determinism for resume, bucketing benefit, and collation."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from nmtkit.batching import BOS_ID, EOS_ID, PAD_ID, Batch, collate, make_batches, padding_fraction, read_batch

MAX_TOKENS = 512


@pytest.fixture(scope="module")
def lens() -> tuple[np.ndarray, np.ndarray]:
    """3,000 pairs with a skewed length distribution and targets roughly as long as their sources."""
    rng = np.random.default_rng(0)
    src = np.clip(rng.lognormal(2.3, 0.6, 3000).astype(np.int64), 1, 120)
    tgt = np.clip((src * rng.uniform(0.6, 1.4, 3000)).astype(np.int64), 1, 120)
    return src, tgt


def padded_size(batch: np.ndarray, src: np.ndarray, tgt: np.ndarray) -> int:
    return len(batch) * int(max(src[batch].max(), tgt[batch].max()) + 1)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_respect_the_token_budget(lens, shuffle: bool) -> None:
    src, tgt = lens
    batches = make_batches(src, tgt, MAX_TOKENS, shuffle=shuffle)
    assert all(padded_size(b, src, tgt) <= MAX_TOKENS for b in batches)
    # Greedy cutting fills batches: on average well over half the budget.
    assert np.mean([padded_size(b, src, tgt) for b in batches]) > 0.75 * MAX_TOKENS


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_index_appears_exactly_once(lens, shuffle: bool) -> None:
    src, tgt = lens
    batches = make_batches(src, tgt, MAX_TOKENS, shuffle=shuffle, seed=3, epoch=5)
    assert all(b.dtype == np.int64 for b in batches)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(src)))


def test_shuffled_batches_are_deterministic_for_seed_and_epoch(lens) -> None:
    src, tgt = lens
    first = make_batches(src, tgt, MAX_TOKENS, shuffle=True, seed=7, epoch=2)
    again = make_batches(src, tgt, MAX_TOKENS, shuffle=True, seed=7, epoch=2)
    assert len(first) == len(again) and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_different_epochs_and_seeds_give_different_orders(lens) -> None:
    src, tgt = lens
    base = np.concatenate(make_batches(src, tgt, MAX_TOKENS, shuffle=True, seed=7, epoch=2))
    next_epoch = np.concatenate(make_batches(src, tgt, MAX_TOKENS, shuffle=True, seed=7, epoch=3))
    other_seed = np.concatenate(make_batches(src, tgt, MAX_TOKENS, shuffle=True, seed=8, epoch=2))
    assert not np.array_equal(base, next_epoch)
    assert not np.array_equal(base, other_seed)


def test_unshuffled_batches_are_length_sorted_and_repeatable(lens) -> None:
    src, tgt = lens
    batches = make_batches(src, tgt, MAX_TOKENS, shuffle=False)
    order = np.concatenate(batches)
    assert np.all(np.diff(tgt[order]) >= 0)
    assert np.array_equal(order, np.concatenate(make_batches(src, tgt, MAX_TOKENS, shuffle=False)))


def test_bucketing_pads_less_than_random_batches(lens) -> None:
    src, tgt = lens
    bucketed = make_batches(src, tgt, MAX_TOKENS, shuffle=True, seed=1)
    # Same data, batches of the same average size drawn in random order.
    average = int(np.mean([len(b) for b in bucketed]))
    random_order = np.random.default_rng(1).permutation(len(src))
    random_batches = np.array_split(random_order, len(src) // average)
    bucketed_src, bucketed_tgt = padding_fraction(bucketed, src, tgt)
    random_src, random_tgt = padding_fraction(random_batches, src, tgt)
    assert bucketed_tgt < 0.5 * random_tgt
    assert bucketed_src < random_src


def test_padding_fraction_is_zero_for_equal_lengths() -> None:
    lens = np.full(10, 5)
    assert padding_fraction([np.arange(5), np.arange(5, 10)], lens, lens) == (0.0, 0.0)
    # One row of 1 piece (2 with EOS) next to one of 3 (4 with EOS): 2 of 8 positions are padding.
    assert padding_fraction([np.array([0, 1])], np.array([1, 3]), np.array([3, 3]))[0] == pytest.approx(0.25)


def test_pair_longer_than_the_budget_raises_with_index_and_length() -> None:
    src = np.array([3, 4, 40, 2])
    tgt = np.array([3, 4, 5, 2])
    with pytest.raises(ValueError, match=r"pair 2 has 40 source / 5 target pieces, so 41 counted tokens.*max_tokens=32"):
        make_batches(src, tgt, 32, shuffle=True)


@pytest.mark.parametrize("shuffle", [True, False])
def test_target_count_budgets_padded_target_tokens_only_and_covers_every_pair(lens, shuffle: bool) -> None:
    src, tgt = lens
    src = src * 2  # sources twice as long: the longer-side budget would cut much smaller batches
    batches = make_batches(src, tgt, MAX_TOKENS, shuffle=shuffle, count="target")
    assert all(len(b) * int(tgt[b].max() + 1) <= MAX_TOKENS for b in batches)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(src)))
    assert len(batches) < 0.7 * len(make_batches(src, tgt, MAX_TOKENS, shuffle=shuffle))


def test_unknown_count_is_refused() -> None:
    with pytest.raises(ValueError, match="count must be 'longer_side' or 'target', got 'source'"):
        make_batches(np.array([3]), np.array([3]), 64, shuffle=False, count="source")


def test_no_pairs_gives_no_batches() -> None:
    assert make_batches(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 64, shuffle=True) == []


def test_collate_adds_eos_and_bos_and_right_pads() -> None:
    batch = collate({"src_ids": [[10, 11, 12], [20]], "tgt_ids": [[30], [40, 41]], "src": ["x", "y"]})
    assert batch.src.tolist() == [[10, 11, 12, EOS_ID], [20, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 30, PAD_ID], [BOS_ID, 40, 41]]
    assert batch.tgt_out.tolist() == [[30, EOS_ID, PAD_ID], [40, 41, EOS_ID]]
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.int64
    assert (batch.n_src_tokens, batch.n_tgt_tokens, batch.padded_tgt_tokens) == (6, 5, 6)


def test_collate_counts_match_non_pad_positions_and_accept_numpy_rows() -> None:
    rng = np.random.default_rng(0)
    src_ids = [rng.integers(4, 100, n, dtype=np.int32) for n in (5, 1, 9, 3)]
    tgt_ids = [rng.integers(4, 100, n, dtype=np.int32) for n in (2, 7, 4, 0)]
    batch = collate({"src_ids": src_ids, "tgt_ids": tgt_ids})
    assert batch.src.shape == (4, 10) and batch.tgt_in.shape == batch.tgt_out.shape == (4, 8)
    assert batch.n_src_tokens == int((batch.src != PAD_ID).sum())
    assert batch.n_tgt_tokens == int((batch.tgt_out != PAD_ID).sum()) == int((batch.tgt_in != PAD_ID).sum())
    # Teacher forcing: the decoder input is the output shifted right by one, behind BOS.
    for row, ids in enumerate(tgt_ids):
        assert batch.tgt_in[row, 1 : len(ids) + 1].tolist() == batch.tgt_out[row, : len(ids)].tolist() == ids.tolist()


def test_batch_to_moves_every_tensor_and_keeps_counts() -> None:
    batch = collate({"src_ids": [[5, 6]], "tgt_ids": [[7]]})
    moved = batch.to("cpu")
    assert isinstance(moved, Batch)
    assert torch.equal(moved.src, batch.src) and torch.equal(moved.tgt_out, batch.tgt_out)
    assert (moved.n_src_tokens, moved.n_tgt_tokens) == (3, 2)


def encoded_split(n: int, seed: int) -> datasets.Dataset:
    """A split shaped like nmtkit's encoded ones (int32 id lists and their lengths), in several Arrow chunks."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(3):
        src = [rng.integers(4, 8000, k, dtype=np.int32).tolist() for k in rng.integers(1, 30, n)]
        tgt = [rng.integers(4, 8000, k, dtype=np.int32).tolist() for k in rng.integers(0, 30, n)]  # an empty one too
        features = datasets.Features({"src_ids": datasets.List(datasets.Value("int32")), "tgt_ids": datasets.List(datasets.Value("int32"))})
        parts.append(datasets.Dataset.from_dict({"src_ids": src, "tgt_ids": tgt}, features=features))
    return datasets.concatenate_datasets(parts)


def assert_same_batch(a: Batch, b: Batch) -> None:
    for name in ("src", "tgt_in", "tgt_out"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.n_src_tokens, a.n_tgt_tokens) == (b.n_src_tokens, b.n_tgt_tokens)


def test_read_batch_reads_the_same_batch_as_collate_from_arrow_arrays() -> None:
    ds = encoded_split(200, seed=0)
    assert ds.data.table["src_ids"].num_chunks == 3
    rng = np.random.default_rng(1)
    for size in (1, 7, 300):
        index = rng.choice(len(ds), size, replace=False)  # across chunks, out of order
        assert_same_batch(read_batch(ds, index), collate(ds[index]))


def test_take_rows_gives_arrows_take_without_joining_the_chunks() -> None:
    """Each chunk gives its own rows (Arrow's take over a chunked list column copies the whole column first); rows come
    back in the order asked for, repeats and an empty chunk included."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from nmtkit.batching import take_rows

    rng = np.random.default_rng(4)
    pieces = [[rng.integers(4, 99, k).tolist() for k in rng.integers(0, 9, n)] for n in (5, 0, 7, 1, 12)]
    table = pa.Table.from_batches([pa.record_batch({"ids": pa.array(p, type=pa.list_(pa.int32()))}) for p in pieces])
    assert table["ids"].num_chunks == 5
    for rows in ([24, 0, 5, 5, 12, 13, 4], rng.integers(0, 25, 60).tolist(), [11]):
        assert take_rows(table, np.array(rows)).to_pydict() == table.take(pa.array(rows)).to_pydict()
    # what Arrow allocates for 3 rows of 200 chunks of 1,000 rows: the rows, not the column that a take over the
    # chunked table joins first
    big = pa.Table.from_batches([pa.record_batch({"ids": pa.array([[i, i + 1, i + 2]] * 1000, type=pa.list_(pa.int32()))}) for i in range(200)])
    rows = np.array([199_999, 5, 123_456])
    ours, joined = pa.proxy_memory_pool(pa.default_memory_pool()), pa.proxy_memory_pool(pa.default_memory_pool())
    assert take_rows(big, rows, memory_pool=ours).to_pydict() == pc.take(big, pa.array(rows), memory_pool=joined).to_pydict()
    column_bytes = big["ids"].nbytes
    assert joined.max_memory() >= column_bytes / 2 and ours.max_memory() < column_bytes / 100


def test_read_batch_follows_a_datasets_row_mapping() -> None:
    ds = encoded_split(50, seed=2)
    shuffled = ds.shuffle(seed=0).select(range(100))  # rows behind an indices mapping, not a rewritten table
    index = np.array([99, 0, 17, 42])
    assert_same_batch(read_batch(shuffled, index), collate(shuffled[index]))


def test_read_batch_of_no_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty batch"):
        read_batch(encoded_split(5, seed=3), np.array([], dtype=np.int64))
