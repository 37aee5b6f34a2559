"""Data fuzzing: whatever bytes a data file holds, `load_split` and `encode_split` return a dataset or raise
a DataError that names the file; never another exception (and never a crash of the process)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import (
    one_torch_thread,  # noqa: F401 (autouse: tiny models train on one thread)
    subprocess_env,
)

from nmtkit.config import DataConfig
from nmtkit.data import DataError, load_split
from nmtkit.encoded import encode_split

datasets.logging.set_verbosity_error()
datasets.disable_progress_bars()

FORMATS = [".jsonl", ".json", ".tsv", ".csv", "text pair"]


class WordLengthTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word, so a 10 MB line encodes fast."""

    fingerprint = "word-length-v1"

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        return [[4 + len(word) % 50 for word in text.split()] for text in texts]

    encode_tgt = encode_src


def write_data(directory: Path, name: str, fmt: str, content: bytes, tgt_content: bytes | None = None) -> tuple[str, list[Path]]:
    """Write `content` as a data file of format `fmt`: (the data.train value, the files written). A text
    pair gets `tgt_content` (default: the same bytes) as its target side."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "text pair":
        src, tgt = directory / f"{name}.en", directory / f"{name}.zh"
        src.write_bytes(content)
        tgt.write_bytes(content if tgt_content is None else tgt_content)
        return str(directory / f"{name}.{{lang}}"), [src, tgt]
    path = directory / f"{name}{fmt}"
    path.write_bytes(content)
    return str(path), [path]


def load_and_encode(source: str, files: list[Path], cache: Path) -> datasets.Dataset | None:
    """Load and encode the split; None after a DataError that names one of `files`."""
    cfg = DataConfig(train=source)
    try:
        ds = load_split(cfg, "train", cache)
        encoded, report = encode_split(ds, WordLengthTokenizer(), cfg, "train", apply_filters=True)
    except DataError as e:
        assert any(str(f) in str(e) for f in files), f"the error does not name the file: {e}"
        return None
    assert ds.column_names == ["src", "tgt"] and report.total == len(ds)
    return encoded


# JSON and table punctuation, language keys, newlines of all kinds, NUL, invalid UTF-8 and CJK.
pieces = st.sampled_from([b"en", b"zh", b'"en"', b'"zh"', b'"translation"', b"\t", b",", b":", b"{", b"}", b"[", b"]",
                          b'"', b"null", b"1", b" ", b"a", b"\n", b"\r", b"\r\n", b"\x00", b"\xff", "中".encode()])
contents = st.one_of(st.binary(max_size=300), st.lists(pieces, max_size=40).map(b"".join))
examples = itertools.count()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=contents, fmt=st.sampled_from(FORMATS))
def test_random_bytes_give_a_dataset_or_a_data_error_naming_the_file(content: bytes, fmt: str, tmp_path: Path) -> None:
    # a new file name per example: the datasets cache must never hand back an earlier example's table
    source, files = write_data(tmp_path / "data", f"fuzz{next(examples)}", fmt, content)
    load_and_encode(source, files, tmp_path / "cache")


def jsonl(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


GOOD = '{"en": "Hello.", "zh": "你好。"}'
TEN_MB = "a" * 10_000_000
NAMED_CASES = {
    # name: (format, content, expected number of loaded pairs or None for a DataError)
    "invalid-utf8-jsonl": (".jsonl", jsonl(GOOD) + b'{"en": "\xff\xfe", "zh": "x"}\n', None),
    "invalid-utf8-tsv": (".tsv", b"en\tzh\nhello\t\xc3\x28\n", None),
    "invalid-utf8-text": ("text pair", b"ok\n\xe4\xb8\n", None),
    "nul-bytes-jsonl": (".jsonl", b"\x00" * 20 + b"\n", None),
    "nul-bytes-in-tsv-text": (".tsv", b"en\tzh\nhel\x00lo\tx\n", 1),
    "empty-jsonl": (".jsonl", b"", None),
    "empty-json": (".json", b"", None),
    "empty-tsv": (".tsv", b"", None),
    "empty-csv": (".csv", b"", None),
    "empty-text": ("text pair", b"", None),
    "only-a-byte-order-mark-jsonl": (".jsonl", b"\xef\xbb\xbf", None),
    "empty-json-array": (".json", b"[]", None),
    "empty-json-array-with-a-byte-order-mark": (".json", b"\xef\xbb\xbf[\n]\n", None),
    "json-array-with-a-byte-order-mark-and-mixed-ids": (".json", b'\xef\xbb\xbf[{"en": "a", "zh": "b", "id": 1}, {"en": "c", "zh": "d", "id": "x"}]', 2),
    "10mb-line-jsonl": (".jsonl", jsonl('{"en": "' + TEN_MB + '", "zh": "x"}', GOOD), 2),
    "10mb-line-tsv": (".tsv", ("en\tzh\n" + TEN_MB + "\tx\nhi\tyo\n").encode(), 2),
    "10mb-line-text": ("text pair", (TEN_MB + "\nhi\n").encode(), 2),
    "10mb-header-tsv": (".tsv", (TEN_MB + "\n").encode(), None),
    "mixed-newlines-jsonl": (".jsonl", (GOOD + "\r\n" + GOOD + "\n" + GOOD + "\r\n").encode(), 3),
    "cr-newlines-tsv": (".tsv", b"en\tzh\rhello\tworld\rbye\tnow\r", None),
    "mixed-newlines-tsv": (".tsv", b"en\tzh\r\nhello\tworld\nbye\tnow\r\n", 2),
    "mixed-newlines-csv": (".csv", b"en,zh\r\nhello,world\nbye,now\r\n", 2),
    "json-number-lines": (".jsonl", jsonl("5", "6"), None),
    "json-string-line": (".jsonl", jsonl(GOOD, '"just a string"'), None),
    "json-null-after-a-record": (".jsonl", jsonl(GOOD, "null"), None),
    "json-array-of-numbers": (".json", b"[1, 2, 3]", None),
    "json-array-with-a-number": (".json", ("[" + GOOD + ", 5]").encode(), None),
    "json-translation-not-an-object": (".jsonl", jsonl('{"translation": "en=hello"}'), None),
    "tsv-header-without-languages": (".tsv", b"source\ttarget\nhello\tworld\n", None),
    "header-only-tsv": (".tsv", b"en\tzh\n", None),
    "byte-order-mark-csv": (".csv", "\ufeffen,zh\nhello,world\nbye,now\n".encode(), 2),
    "byte-order-mark-tsv": (".tsv", "\ufeffen\tzh\nhello\tworld\n".encode(), 1),
    "crlf-text": ("text pair", b"hello\r\nbye\r\n", 2),
    "cr-line-endings-text": ("text pair", b"hello\rbye\r", 2),  # no line feed at all: both sides split alike
    "cr-at-the-end-of-a-text": ("text pair", b"hello\nbye\r", 2),
    "carriage-return-inside-a-text-line": ("text pair", b"one\rtwo\nthree\n", None),
}


@pytest.mark.parametrize("fmt, content, expected", NAMED_CASES.values(), ids=NAMED_CASES.keys())
def test_malformed_file_gives_a_dataset_or_a_data_error_naming_the_file(fmt: str, content: bytes, expected: int | None, tmp_path: Path) -> None:
    source, files = write_data(tmp_path / "data dir", "case", fmt, content)
    result = load_and_encode(source, files, tmp_path / "cache")
    assert (None if result is None else len(result)) == expected


def test_text_pair_with_different_line_counts_is_a_data_error_naming_both_files(tmp_path: Path) -> None:
    source, files = write_data(tmp_path, "pair", "text pair", b"one\ntwo\nthree\n", b"eins\nzwei\n")
    with pytest.raises(DataError, match="differ in length") as info:
        load_split(DataConfig(train=source), "train", tmp_path / "cache")
    assert all(str(f) in str(info.value) for f in files)


@pytest.mark.parametrize(
    "fmt, content, tgt_content, message",
    [
        (".jsonl", b"", None, "has no records"),
        (".jsonl", b"\n  \n", None, "has no records"),
        (".tsv", b"en\tzh\n", None, "a header but no rows"),
        # both sides break at the \r alike, so the line counts agree and only the scan sees the shift
        ("text pair", b"one\rtwo\nthree\n", b"eins\rzwei\ndrei\n", "line 1: a carriage return"),
        ("text pair", b"one\ntwo\nthree\n", b"eins\nzwei\rzwo\ndrei\n", "line 2: a carriage return"),
    ],
    ids=["empty-jsonl", "blank-jsonl", "header-only-tsv", "carriage-return-in-both-sides", "carriage-return-in-the-target"],
)
def test_empty_files_and_line_breaking_carriage_returns_are_data_errors_that_say_so(
    fmt: str, content: bytes, tgt_content: bytes | None, message: str, tmp_path: Path
) -> None:
    source, files = write_data(tmp_path, "case", fmt, content, tgt_content)
    with pytest.raises(DataError, match=message) as info:
        load_split(DataConfig(train=source), "train", tmp_path / "cache")
    assert any(str(f) in str(info.value) for f in files)


def test_csv_with_a_byte_order_mark_reads_its_first_column_by_name(tmp_path: Path) -> None:
    source, _ = write_data(tmp_path, "excel", ".csv", "\ufeffen,zh\nhello,你好\n".encode())
    ds = load_split(DataConfig(train=source), "train", tmp_path / "cache")
    assert ds[0] == {"src": "hello", "tgt": "你好"}


def test_tsv_row_missing_its_tab_is_a_data_error_naming_the_line(tmp_path: Path) -> None:
    """A short row (a broken export) would read as a pair with an empty target, dropped in training and scored against
    an empty reference by evaluate; an extra tab was already an error."""
    source, _ = write_data(tmp_path, "short", ".tsv", b"en\tzh\nhello\nbig cat\tgrosse katze\n")
    with pytest.raises(DataError, match=r"short\.tsv, line 2: 1 fields, the header has 2; check for a missing tab in the text"):
        load_split(DataConfig(train=source), "train", tmp_path / "cache")


def test_tsv_row_with_an_empty_target_is_counted_empty_and_dropped(tmp_path: Path) -> None:
    """An empty cell written as such (the tab is there) is a pair with an empty side, as in JSON."""
    source, _ = write_data(tmp_path, "empty", ".tsv", b"en\tzh\nhello\t\nbig cat\tgrosse katze\n")
    cfg = DataConfig(train=source)
    encoded, report = encode_split(load_split(cfg, "train", tmp_path / "cache"), WordLengthTokenizer(), cfg, "train")
    assert (report.total, report.empty, report.kept) == (2, 1, 1)
    tokenizer = WordLengthTokenizer()
    assert encoded["src_ids"] == tokenizer.encode_src(["big cat"]) and encoded["tgt_ids"] == tokenizer.encode_tgt(["grosse katze"])


# pyarrow's JSON reader segfaults on a block that starts with `null`; in this process it would take the
# whole test session down, so these files are loaded in a child process.
NULL_FIRST = r"""
import sys
import datasets
from nmtkit.config import DataConfig
from nmtkit.data import DataError, load_split

datasets.logging.set_verbosity_error()
for path in sys.argv[2:]:
    try:
        load_split(DataConfig(train=path), "train", sys.argv[1])
        print("loaded", path)
    except DataError as e:
        print("DataError", e)
"""


def null_at_a_block_start() -> bytes:
    """~1 MB of records with a `null` line exactly where pyarrow's second block starts (datasets reads
    files under 2.6 MB in blocks of 320 KB that end at the last newline that fits)."""
    block, line = 320 * 1024, (GOOD + "\n").encode()
    head = line * (block // len(line) - 1)
    pad = block - 2 - len(head) - len(b'{"en": "", "zh": "x"}\n')  # head + "null\n" must overrun the block
    head += b'{"en": "' + b"a" * pad + b'", "zh": "x"}\n'
    return head + b"null\n" + line * 20_000


def test_json_lines_starting_with_null_give_a_data_error_and_do_not_crash_the_process(tmp_path: Path) -> None:
    cases = {"null": b"null\n", "bom-null": b"\xef\xbb\xbfnull\n", "indented-null": b"\n  null\n" + GOOD.encode(),
             "null-x": b"nullx\n", "null-at-a-block-start": null_at_a_block_start()}
    paths = [write_data(tmp_path, name, ".jsonl", content)[0] for name, content in cases.items()]
    child = subprocess.run([sys.executable, "-c", NULL_FIRST, str(tmp_path / "cache"), *paths],
                           capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    lines = child.stdout.splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        assert line.startswith(f"DataError {path}, line ") and ("expected a JSON object" in line or "not valid JSON" in line), line
