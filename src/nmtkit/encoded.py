"""Tokenised splits: piece ids and lengths in a cached Arrow table, length filters that count what they drop, and
the lengths and a digest of what a split holds.

`encode_split` writes piece ids and lengths with a `map` cached on disk under a fingerprint of (data, tokenizer),
so a second run does not re-encode, and counts (and, for training, removes) empty, too long and badly
length-ratioed pairs. Filtered rows are written to a new table, never hidden behind an index mapping, and every
pass reads a batch at a time.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol

import datasets
import numpy as np
import pyarrow as pa

from .config import DataConfig
from .data import ROWS_PER_BATCH

log = logging.getLogger(__name__)

# Rows per record batch (chunk) of a training table. Reading a batch takes rows chunk by chunk (`take_rows`), so
# fewer chunks cost less: a 16k-token batch of 1M pairs in 1,000-row chunks touched ~1,000 of them. A chunk this
# size is ~10 MB of ids, combined once when the table is written.
TRAIN_CHUNK_ROWS = 100_000

# Bump when the output of `_encode_batch` changes, so old cached tables are not reused.
_ENCODE_VERSION = "v2"  # v2: ids and lengths only, no copy of the text


class Tokenizer(Protocol):
    """What `encode_split` needs: piece ids without BOS/EOS, and a hash that identifies the model."""

    fingerprint: str

    def encode_src(self, texts: list[str]) -> list[list[int]]: ...

    def encode_tgt(self, texts: list[str]) -> list[list[int]]: ...


@dataclass
class FilterReport:
    """What the length filters found in one split. Counts are pairs; each pair counts under its first reason."""

    split: str
    total: int
    kept: int  # pairs in the returned dataset (= total when the filters were only counted)
    empty: int  # a side is empty after strip
    too_long: int  # src or tgt has more than data.max_len pieces
    bad_ratio: int  # longer side / shorter side > data.max_len_ratio
    is_applied: bool = True  # False: counted but not removed (valid/test)

    def summary(self) -> str:
        reasons = f"empty {self.empty:,}, too long {self.too_long:,}, length ratio {self.bad_ratio:,}"
        if not self.is_applied:
            return f"{self.split}: {self.total:,} pairs, not filtered (would drop: {reasons})"
        return f"{self.split}: kept {self.kept:,} of {self.total:,} pairs ({reasons})"


def encode_split(
    ds: datasets.Dataset, tokenizer: Tokenizer, cfg: DataConfig, split: str, apply_filters: bool = True
) -> tuple[datasets.Dataset, FilterReport]:
    """Piece ids `src_ids`/`tgt_ids` (int32 lists, no BOS/EOS) and lengths `src_len`/`tgt_len` (int32).

    The encoded table is cached on disk next to `ds` under a fingerprint of (ds, tokenizer), so the same data
    and tokenizer are encoded once. Filtered pairs are always counted. With `apply_filters` (training) they
    are removed, and the result holds the four encoded columns only; without (evaluation) every pair stays
    and the result also has `ds`'s `src`/`tgt` text, for references.
    """
    # `datasets` fingerprints a local file by its path and modification time alone; the names of its Arrow files hold
    # each file's whole identity (data.py's `_file_cache`), so a target file of a line-aligned pair replaced at the
    # same time (`cp -p`, `rsync -a`) is encoded again, not served from the old encoding
    fingerprint = _hash(ds._fingerprint, *(f["filename"] for f in ds.cache_files), tokenizer.fingerprint, _ENCODE_VERSION)
    features = datasets.Features()
    for side in ("src", "tgt"):
        features[f"{side}_ids"] = datasets.List(datasets.Value("int32"))
        features[f"{side}_len"] = datasets.Value("int32")
    # The text is not copied into the encoded table: `ds` has it already, and random training reads would
    # bring its pages into memory too (for 10M pairs the table is 0.9 GB without the text, 1.5 GB with it).
    encoded = ds.map(
        _encode_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer},
        features=features,
        remove_columns=ds.column_names,
        new_fingerprint=fingerprint,
        load_from_cache_file=True,
        num_proc=None,
        desc=f"encoding {split}",
    )
    lens = encoded.with_format("numpy", columns=["src_len", "tgt_len"])[:]  # two int32 arrays, not the corpus
    empty, too_long, bad_ratio = _filter_reasons(lens["src_len"], lens["tgt_len"], cfg.max_len, cfg.max_len_ratio)
    if not apply_filters:
        encoded = datasets.concatenate_datasets([ds, encoded], axis=1)  # the text again, without a copy
    else:
        # The kept rows are written to a new table, one vectorised pass in Arrow. (`Dataset.filter` would
        # keep an index mapping instead, and every read through one goes row by row in Python: reading the
        # lengths of 10M pairs would build 10M one-row tables.) Also without a row to drop: the pass writes
        # record batches of TRAIN_CHUNK_ROWS rows, so that a training batch touches few of them (`take_rows`).
        encoded = encoded.with_format("arrow").map(
            _keep_rows,
            batched=True,
            batch_size=TRAIN_CHUNK_ROWS,
            writer_batch_size=TRAIN_CHUNK_ROWS,
            fn_kwargs={"max_len": cfg.max_len, "max_ratio": cfg.max_len_ratio},
            new_fingerprint=_hash(fingerprint, "keep rows", str(cfg.max_len), repr(cfg.max_len_ratio), str(TRAIN_CHUNK_ROWS)),
            load_from_cache_file=True,
            desc=f"filtering {split}",
        ).with_format(None)
    report = FilterReport(
        split=split,
        total=len(lens["src_len"]),
        kept=len(encoded),
        empty=int(empty.sum()),
        too_long=int(too_long.sum()),
        bad_ratio=int(bad_ratio.sum()),
        is_applied=apply_filters,
    )
    return encoded, report


def readable_pairs(ds: datasets.Dataset, max_positions: int) -> tuple[datasets.Dataset, int]:
    """The pairs a model with `max_positions` can read whole (each side's pieces plus BOS/EOS): nothing else is left
    out, as evaluation and validation score a split. -> (those pairs, how many were left out)."""
    src_lens, tgt_lens = length_arrays(ds)
    fits = (src_lens < max_positions) & (tgt_lens < max_positions)
    n_too_long = int((~fits).sum())
    if n_too_long:
        log.warning("%d pairs longer than model.max_positions=%d left out of the loss", n_too_long, max_positions)
        ds = ds.select(np.flatnonzero(fits))
    return ds, n_too_long


def content_digest(ds: datasets.Dataset, columns: tuple[str, ...]) -> str:
    """A digest of the values of `columns` (int32 id lists or numbers) in row order, read as Arrow batches: two
    encoded splits with the same digest hold the same pairs."""
    h = hashlib.blake2b(digest_size=16)
    for batch in ds.with_format("arrow", columns=list(columns)).iter(batch_size=ROWS_PER_BATCH):
        for name in columns:
            column = batch.column(name).combine_chunks()  # the same bytes however the table's chunks fall
            if pa.types.is_list(column.type):
                h.update(column.value_lengths().to_numpy(zero_copy_only=False).tobytes())
                column = column.flatten()
            h.update(column.to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


def length_arrays(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(src_len, tgt_len) of an encoded split as two int32 arrays, read in one Arrow slice.

    (Indexing a column of a formatted dataset returns a lazy Column that converts row by row,
    which takes seconds on a corpus; slicing first is a single columnar read.)
    """
    lens = ds.with_format("numpy", columns=["src_len", "tgt_len"])[:]
    return lens["src_len"], lens["tgt_len"]


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _encode_batch(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
    out: dict[str, list] = {}
    for side, encode in (("src", tokenizer.encode_src), ("tgt", tokenizer.encode_tgt)):
        texts = batch[side]
        # A whitespace-only side gets no pieces, so "empty" means the same thing for every tokenizer.
        ids = [piece_ids if text.strip() else [] for text, piece_ids in zip(texts, encode(texts), strict=True)]
        out[f"{side}_ids"] = ids
        out[f"{side}_len"] = [len(x) for x in ids]
    return out


def _filter_reasons(
    src_len: np.ndarray, tgt_len: np.ndarray, max_len: int, max_ratio: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (N,), disjoint: a pair is flagged for its first reason in the order empty, too long, ratio."""
    src_len, tgt_len = np.asarray(src_len, dtype=np.int64), np.asarray(tgt_len, dtype=np.int64)
    shorter, longer = np.minimum(src_len, tgt_len), np.maximum(src_len, tgt_len)
    empty = shorter == 0
    too_long = ~empty & (longer > max_len)
    bad_ratio = ~empty & ~too_long & (longer / np.maximum(shorter, 1) > max_ratio)
    return empty, too_long, bad_ratio


def _keep_rows(batch: pa.Table, max_len: int, max_ratio: float) -> pa.Table:
    src_len, tgt_len = batch.column("src_len").to_numpy(), batch.column("tgt_len").to_numpy()
    empty, too_long, bad_ratio = _filter_reasons(src_len, tgt_len, max_len, max_ratio)
    return batch.filter(pa.array(~(empty | too_long | bad_ratio))).combine_chunks()  # one record batch when written
