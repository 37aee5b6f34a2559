"""The large-corpus path: scripts/make_big_corpus.py writes a perturbed, repeated corpus as a stream, and a
training split goes from JSONL to batches through memory-mapped Arrow, so memory does not grow with the corpus."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import datasets
import pytest

from nmtkit import run_tokenizer as tokenizer_module
from nmtkit.config import DataConfig, TokenizerConfig, load_config
from nmtkit.data import load_split
from nmtkit.encoded import encode_split, length_arrays
from nmtkit.tokenizer import Tokenizer

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("make_big_corpus", ROOT / "scripts" / "make_big_corpus.py")
assert spec is not None and spec.loader is not None
make_big_corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_big_corpus)

N_SOURCE = 26_759  # pairs in the bundled training split


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200,000 pairs: 7.5 copies of the bundled split."""
    return make_big_corpus.write_big_corpus(tmp_path_factory.mktemp("big") / "train.jsonl", 200_000, seed=0)


# ----------------------------------------------------------------------------- the script


def test_script_writes_the_schema_and_count_with_copy_0_verbatim_and_later_copies_perturbed(tmp_path: Path) -> None:
    n = 2 * N_SOURCE + 100
    out = make_big_corpus.main([str(tmp_path / "c.jsonl"), "--pairs", str(n), "--seed", "1"])
    records = read_records(tmp_path / "c.jsonl")
    source = read_records(make_big_corpus.BUNDLED)
    assert out == 0 and len(records) == n and len(source) == N_SOURCE
    assert all(r.keys() == {"translation", "attribution"} and r["translation"].keys() == {"en", "zh"} for r in records)
    assert all(r["translation"]["en"] and r["translation"]["zh"] for r in records)
    assert records[:N_SOURCE] == source  # copy 0 is the bundled split itself
    copy_1 = records[N_SOURCE : 2 * N_SOURCE]
    assert [r["attribution"] for r in copy_1] == [r["attribution"] for r in source]
    en_changed = sum(a["translation"]["en"] != b["translation"]["en"] for a, b in zip(copy_1, source, strict=True))
    zh_changed = sum(a["translation"]["zh"] != b["translation"]["zh"] for a, b in zip(copy_1, source, strict=True))
    assert en_changed > 0.98 * N_SOURCE  # one edit per English sentence (swapping "very very" changes nothing)
    assert 0.3 * N_SOURCE < zh_changed < 0.6 * N_SOURCE  # half the Chinese sentences of 4+ characters


def test_script_output_is_deterministic_for_a_seed_and_changes_with_it(tmp_path: Path) -> None:
    n = N_SOURCE + 2_000
    paths = [make_big_corpus.write_big_corpus(tmp_path / f"{name}.jsonl", n, seed) for name, seed in (("a", 5), ("b", 5), ("c", 6))]
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b and a != c


def test_script_streams_pairs_instead_of_building_them_all() -> None:
    source = make_big_corpus.read_source(make_big_corpus.BUNDLED)
    t0 = time.perf_counter()
    first = list(itertools.islice(make_big_corpus.big_corpus_lines(source, 10**12, seed=0), 3))  # a trillion pairs
    assert len(first) == 3 and time.perf_counter() - t0 < 1.0


def test_script_rejects_a_bad_source_line_naming_file_and_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"translation": {"en": "a", "zh": "b"}}\n{"translation": {"en": "c"}}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=rf"{bad}:2: expected a JSON record with translation.en and translation.zh"):
        make_big_corpus.main([str(tmp_path / "out.jsonl"), "--pairs", "5", "--source", str(bad)])


# ----------------------------------------------------------------------------- the data path at scale


class CharTokenizer:
    """One piece per non-space character (enough to exercise encoding without training SentencePiece)."""

    fingerprint = "char-tokenizer-big"

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [[4 + ord(c) % 1000 for c in text if not c.isspace()] for text in texts]

    encode_src = encode_tgt = _encode


def test_encoded_and_filtered_split_is_a_memory_mapped_table_without_an_index_mapping(big_corpus: Path, tmp_path: Path) -> None:
    cfg = DataConfig(train=str(big_corpus), max_len=40, max_len_ratio=3.0)
    ds, report = encode_split(load_split(cfg, "train", tmp_path / "cache"), CharTokenizer(), cfg, "train")
    assert report.total == 200_000 and 0 < report.kept < report.total  # the filters removed some pairs
    assert isinstance(ds.data, datasets.table.MemoryMappedTable) and ds.cache_files
    # Filtered rows are written out, not hidden behind an index mapping, which `datasets` reads row by row.
    assert ds._indices is None
    src_lens, tgt_lens = length_arrays(ds)
    assert len(src_lens) == len(ds) == report.kept and src_lens.max() <= 40 and tgt_lens.max() <= 40


def test_tokenizer_trains_on_a_seeded_sample_of_tokenizer_max_sentences(big_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[list[str], list[str]]] = []

    def recording_train_tokenizer(cfg: TokenizerConfig, src_texts: Iterable[str], tgt_texts: Iterable[str]) -> Tokenizer:
        seen.append((list(src_texts), list(tgt_texts)))
        return real_train_tokenizer(cfg, *seen[-1])

    real_train_tokenizer = tokenizer_module.train_tokenizer
    monkeypatch.setattr(tokenizer_module, "train_tokenizer", recording_train_tokenizer)
    overrides = [f"data.train={big_corpus}", "tokenizer.vocab_size=1500", "tokenizer.max_sentences=1000"]
    for name in ("a", "b"):
        cfg = load_config(None, [*overrides, f"train.run_dir={tmp_path / name}"])
        raw = load_split(cfg.data, "train", tmp_path / "cache")
        tokenizer_module.prepare_tokenizer(cfg, tmp_path / name, raw)
    (src, tgt), again = seen
    assert len(src) == len(tgt) == 500  # a joint model reads both sides: 500 pairs make 1,000 sentences
    assert again == (src, tgt)  # the sample depends on train.seed only
    records = [(r["translation"]["en"], r["translation"]["zh"]) for r in read_records(big_corpus)]
    sample = list(zip(src, tgt, strict=True))
    assert set(sample) <= set(records)  # whole pairs, in step
    first_copy = set(records[:N_SOURCE])  # 13% of the corpus: a sample from its start would be all in here
    assert sum(pair not in first_copy for pair in sample) > 0.6 * len(sample)


# Runs in a fresh interpreter so that its memory is its own, going from JSONL to batches as `nmtkit train`
# does: first all the way on a small corpus, which imports every lazily imported module and fills the
# allocators' pools, then on the large one, whose loading (the `datasets` JSON builder, which parses the file
# in 10 MB chunks) comes before the parent reads its baseline. What follows it is nmtkit's own work.
CHILD = """
import gc, json, sys, tracemalloc
import pyarrow
from pathlib import Path
from nmtkit.batching import make_batches, read_batch
from nmtkit.config import load_config
from nmtkit.data import load_split
from nmtkit import encoded
from nmtkit.encoded import encode_split, length_arrays
from nmtkit.run_tokenizer import prepare_tokenizer

def config(corpus, run_dir):
    return load_config(None, [f"data.train={corpus}", f"train.run_dir={run_dir}", "tokenizer.vocab_size=2000",
                              "tokenizer.max_sentences=4000"])

def tokenize_and_plan(cfg, raw):
    tokenizer = prepare_tokenizer(cfg, Path(cfg.train.run_dir), raw)
    ds, report = encode_split(raw, tokenizer, cfg.data, "train")
    src_lens, tgt_lens = length_arrays(ds)
    batches = make_batches(src_lens, tgt_lens, 4096, shuffle=True, seed=1)
    rows = sum(len(read_batch(ds, b).src) for b in batches[:20])  # as the training loop reads them
    return {"total": report.total, "kept": len(ds), "planned": sum(len(b) for b in batches), "rows": rows}

small, big, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
# The training table is written a chunk at a time (100k rows, half this corpus): chunks of 10k rows keep what a chunk
# costs apart from what the corpus would cost if it were held.
encoded.TRAIN_CHUNK_ROWS = 10_000
for corpus, name in ((small, "small"), (big, "big")):
    cfg = config(corpus, work / name)
    raw = load_split(cfg.data, "train", work / "cache")
    if name == "big":
        # Arrow's allocator keeps the JSON builder's freed buffers resident and returns them when it chooses: that
        # release, landing before or after the baseline, moved the baseline by 20-40 MB
        gc.collect()
        pyarrow.default_memory_pool().release_unused()
        tracemalloc.start()  # Python objects and numpy arrays (not Arrow's buffers), counted exactly
        print("ready", flush=True)
        sys.stdin.readline()
    facts = tokenize_and_plan(cfg, raw)
facts["python_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
print(json.dumps(facts))
"""


def rss_anon_mb(pid: int) -> float | None:
    """The process's anonymous resident memory (its heap, not the pages of the files it maps, such as the
    Arrow tables); None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return None  # an exited process that is not yet reaped has no memory lines


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads memory from /proc (Linux)")
def test_tokenizer_encoding_and_batch_plan_of_200k_pairs_do_not_hold_the_corpus_in_memory(big_corpus: Path, tmp_path: Path) -> None:
    # As Python lists, the source ids of these 200k pairs alone take 24 MB (measured); without the tokenizer's
    # sample it grows by 215 MB, with `Dataset.filter`'s index mapping by 315 MB. The Arrow path holds a chunk of
    # rows at a time, the length arrays and the batch plan.
    small = make_big_corpus.write_big_corpus(tmp_path / "small.jsonl", 20_000, seed=1)
    with open(tmp_path / "child.log", "w") as log:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(small), str(big_corpus), str(tmp_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        ready = proc.stdout.readline().strip()
        assert ready == "ready", (tmp_path / "child.log").read_text()
        baseline = rss_anon_mb(proc.pid)
        assert baseline is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        peak = baseline
        # Sampled from outside, so that the child's GIL cannot hide a peak.
        while (now := rss_anon_mb(proc.pid)) is not None:
            peak = max(peak, now)
            time.sleep(0.002)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, (tmp_path / "child.log").read_text()
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["total"] == 200_000 and 0 < facts["kept"] <= 200_000
    assert facts["planned"] == facts["kept"] and facts["rows"] > 0  # the batch plan covers every kept pair once
    print(f"anonymous memory grew by {peak - baseline:.1f} MB over {baseline:.0f} MB; Python's peak {facts['python_peak_mb']:.1f} MB")
    # Measured: Python's peak 10.0 MB every run (numpy temporaries: int64 copies of the lengths, the filter masks and
    # the batch plan), growth 10.6-13.6 MB. The source ids as Python lists would add 24 MB to the first.
    assert facts["python_peak_mb"] < 16, f"Python objects and numpy arrays peaked at {facts['python_peak_mb']:.0f} MB"
    assert peak - baseline < 25, f"anonymous memory grew by {peak - baseline:.0f} MB over {baseline:.0f} MB"
