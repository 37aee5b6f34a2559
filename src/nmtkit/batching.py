"""Token-budget batches from length buckets, and collation into padded tensors.

A batch is a set of row indices whose padded size fits `max_tokens`: `len(batch) * (longer side + 1)` by
default (the memory a batch needs), or `len(batch) * (target length + 1)` with count="target" (the budget of
batches counted in padded target tokens, as the peers in docs/performance.md count them).
Training batches are drawn from shuffled chunks that are sorted by length before cutting, so a batch holds
pairs of similar length (little padding) while the order still changes every epoch. The whole plan is a
pure function of (lengths, max_tokens, count, seed, epoch): a resumed run rebuilds the same list and skips the
batches it already trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

if TYPE_CHECKING:
    import datasets

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3  # fixed special ids (UNK is 1), shared with the tokenizer


def make_batches(
    src_lens: np.ndarray,
    tgt_lens: np.ndarray,
    max_tokens: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    chunk_batches: int = 100,
    count: str = "longer_side",
) -> list[np.ndarray]:
    """Split row indices into batches of at most `max_tokens` padded tokens.

    src_lens, tgt_lens: (N,) piece counts without BOS/EOS; one token is added to each for EOS (source)
    and BOS/EOS (target). Returns int64 index arrays that together hold every index exactly once.
    shuffle=False: one global length sort (evaluation); shuffle=True: random chunks of about
    `chunk_batches` batches, each sorted then cut, and the batches shuffled, all from rng([seed, epoch]).
    count: "longer_side" (max(source, target) + 1 per row) or "target" (target + 1 per row).
    """
    src_lens = np.asarray(src_lens, dtype=np.int64)
    tgt_lens = np.asarray(tgt_lens, dtype=np.int64)
    if src_lens.shape != tgt_lens.shape or src_lens.ndim != 1:
        raise ValueError(f"src_lens {src_lens.shape} and tgt_lens {tgt_lens.shape} must be 1-d and the same length")
    if count not in ("longer_side", "target"):
        raise ValueError(f"count must be 'longer_side' or 'target', got {count!r}")
    # (N,) the padded width a pair forces on its batch
    widths = (tgt_lens if count == "target" else np.maximum(src_lens, tgt_lens)) + 1
    too_wide = np.flatnonzero(widths > max_tokens)
    if too_wide.size:
        i = int(too_wide[0])
        raise ValueError(
            f"pair {i} has {src_lens[i]} source / {tgt_lens[i]} target pieces, so {widths[i]} counted tokens with EOS,"
            f" more than max_tokens={max_tokens}; raise train.max_tokens or lower data.max_len"
        )
    if len(widths) == 0:
        return []
    if not shuffle:
        return _cut(_sort_by_length(np.arange(len(widths)), src_lens, tgt_lens), widths, max_tokens)

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(widths))
    # A chunk holds about `chunk_batches` batches: big enough to find pairs of similar length,
    # small enough that long and short pairs are still mixed across the epoch.
    chunk_size = max(1, int(chunk_batches * max_tokens / widths.mean()))
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk_size):
        chunk = _sort_by_length(order[start : start + chunk_size], src_lens, tgt_lens)
        batches.extend(_cut(chunk, widths, max_tokens))
    return [batches[i] for i in rng.permutation(len(batches))]


def _sort_by_length(indices: np.ndarray, src_lens: np.ndarray, tgt_lens: np.ndarray) -> np.ndarray:
    """`indices` sorted by (tgt_len, src_len); stable, so ties keep their order and results are deterministic."""
    return indices[np.lexsort((src_lens[indices], tgt_lens[indices]))]


def _cut(indices: np.ndarray, widths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut `indices`, in order, into the longest runs whose count * max width fits `max_tokens`."""
    bounds = []
    count, widest = 0, 0
    for position, width in enumerate(widths[indices].tolist()):  # plain ints: a fast Python loop
        if (count + 1) * max(widest, width) > max_tokens:
            bounds.append(position)
            count, widest = 0, 0
        count, widest = count + 1, max(widest, width)
    return np.split(indices, bounds)


def padding_fraction(batches: list[np.ndarray], src_lens: np.ndarray, tgt_lens: np.ndarray) -> tuple[float, float]:
    """(source, target) fraction of padded positions that are padding, over `batches` (with EOS/BOS counted)."""
    src_lens = np.asarray(src_lens, dtype=np.int64) + 1
    tgt_lens = np.asarray(tgt_lens, dtype=np.int64) + 1
    real = np.zeros(2)
    padded = np.zeros(2)
    for batch in batches:
        for side, lens in enumerate((src_lens[batch], tgt_lens[batch])):
            real[side] += lens.sum()
            padded[side] += len(batch) * lens.max()
    fractions = 1.0 - real / np.maximum(padded, 1)
    return float(fractions[0]), float(fractions[1])


@dataclass
class Batch:
    """One training/evaluation batch; all tensors int64 and right-padded with PAD_ID."""

    src: torch.Tensor  # (B, S) source ids + EOS
    tgt_in: torch.Tensor  # (B, T) BOS + target ids: the decoder input
    tgt_out: torch.Tensor  # (B, T) target ids + EOS: what the decoder predicts
    n_src_tokens: int  # non-pad positions in src
    n_tgt_tokens: int  # non-pad positions in tgt_out (the tokens the loss averages over)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on `device`. With `non_blocking` to a GPU the tensors go through pinned memory, so the copy is
        queued behind the running step instead of making the host wait for it."""
        pin = non_blocking and torch.device(device).type == "cuda"
        move = lambda t: (t.pin_memory() if pin and t.device.type == "cpu" else t).to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.src), move(self.tgt_in), move(self.tgt_out), self.n_src_tokens, self.n_tgt_tokens)

    @property
    def padded_tgt_tokens(self) -> int:
        """B * T: target positions including padding (what the compute cost scales with)."""
        return self.tgt_out.numel()


def collate(rows: dict[str, list]) -> Batch:
    """Pad `rows` (columns `src_ids` and `tgt_ids`: lists of piece ids, one list per pair) into a Batch."""
    src_ids, tgt_ids = rows["src_ids"], rows["tgt_ids"]
    if not src_ids or len(src_ids) != len(tgt_ids):
        raise ValueError(
            f"collate needs a non-empty batch with as many targets as sources, got {len(src_ids)}/{len(tgt_ids)}"
        )
    return pad_pairs(*_flat_lists(src_ids), *_flat_lists(tgt_ids))


def read_batch(ds: datasets.Dataset, indices: np.ndarray) -> Batch:
    """Rows `indices` of an encoded split (columns `src_ids`, `tgt_ids`) as a padded Batch: `collate(ds[indices])`
    read as Arrow arrays. `ds[indices]` makes a Python int of every piece id first: 16 ms for a 16k-token batch of
    ~2,400 short pairs, against 0.4 ms here (scripts/batch_read_bench.py), time a GPU's host spends before every step."""
    if len(indices) == 0:
        raise ValueError("read_batch needs a non-empty batch")
    mapping = ds._indices  # a select/shuffle's row mapping, if any (nmtkit's encoded splits have none)
    rows = np.asarray(indices, dtype=np.int64)
    if mapping is not None:
        rows = mapping.column(0).take(pa.array(rows)).to_numpy().astype(np.int64)
    table = take_rows(ds.data.table.select(["src_ids", "tgt_ids"]), rows)
    return pad_pairs(*_flat_arrow(table["src_ids"]), *_flat_arrow(table["tgt_ids"]))


def take_rows(table: pa.Table, rows: np.ndarray, memory_pool: pa.MemoryPool | None = None) -> pa.Table:
    """`table.take(rows)`, one record batch (chunk) at a time. Arrow's take over a chunked list column first joins
    every chunk into one array: a copy of the whole column per call (for 2M pairs in 200 chunks, 29 ms and 145 MB for
    a batch of 2,400 rows). Each chunk gives its own rows instead, put back in the order asked for. (memory_pool: where
    Arrow allocates them; its default pool unless given.)"""
    chunks = table.to_batches()
    if len(chunks) <= 1:
        return pc.take(table, pa.array(rows), memory_pool=memory_pool)
    ends = np.cumsum([len(c) for c in chunks])
    which = np.searchsorted(ends, rows, side="right")  # the chunk of each row
    order = np.argsort(which, kind="stable")
    by_chunk, rows_in_order = which[order], rows[order]
    bounds = np.searchsorted(by_chunk, np.arange(len(chunks) + 1))
    parts = []
    for k in np.flatnonzero(np.diff(bounds)):
        start = ends[k] - len(chunks[k])
        parts.append(pc.take(chunks[k], pa.array(rows_in_order[bounds[k] : bounds[k + 1]] - start), memory_pool=memory_pool))
    grouped = pa.Table.from_batches(parts, schema=table.schema)  # rows grouped by chunk: order[i] is row i's place
    return pc.take(grouped, pa.array(np.argsort(order)), memory_pool=memory_pool)


def _flat_lists(lists: list) -> tuple[np.ndarray, np.ndarray]:
    """Python lists of ids -> (every id end to end, each list's length), both int64."""
    lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    return np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum())), lens


def _flat_arrow(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow column of id lists -> (every id end to end, each list's length), both int64."""
    lists = column.combine_chunks()
    lens = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    return lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64), lens


def pad_pairs(src_flat: np.ndarray, src_lens: np.ndarray, tgt_flat: np.ndarray, tgt_lens: np.ndarray) -> Batch:
    """Padded tensors from every pair's piece ids laid end to end (`*_flat`) and each pair's piece count (`*_lens`):
    EOS after each source, BOS before and EOS after each target."""
    n_rows = len(src_lens)
    src = np.full((n_rows, int(src_lens.max()) + 1), PAD_ID, dtype=np.int64)  # (B, S)
    tgt_in = np.full((n_rows, int(tgt_lens.max()) + 1), PAD_ID, dtype=np.int64)  # (B, T)
    tgt_out = np.full_like(tgt_in, PAD_ID)  # (B, T)
    rows_i = np.arange(n_rows)
    src[_positions(src_lens)] = src_flat
    src[rows_i, src_lens] = EOS_ID
    row, col = _positions(tgt_lens)
    tgt_in[:, 0] = BOS_ID
    tgt_in[row, col + 1] = tgt_flat
    tgt_out[row, col] = tgt_flat
    tgt_out[rows_i, tgt_lens] = EOS_ID
    return Batch(
        src=torch.from_numpy(src),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt_out),
        n_src_tokens=int(src_lens.sum()) + n_rows,
        n_tgt_tokens=int(tgt_lens.sum()) + n_rows,
    )


def _positions(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every piece when rows of `lens` pieces are laid out left-aligned, one row each."""
    row = np.repeat(np.arange(len(lens)), lens)
    starts = np.cumsum(lens) - lens  # where each row begins in the flat layout
    return row, np.arange(int(lens.sum())) - np.repeat(starts, lens)
