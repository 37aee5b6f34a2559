"""Parallel text through Hugging Face `datasets`: load a split as a memory-mapped Arrow table of text pairs.

`load_split` reads .jsonl/.json (HF translation schema or flat records), .tsv/.csv (a column per language),
a line-aligned text pair `path/train.{lang}`, or a hub dataset, and returns a Dataset with two string
columns, `src` and `tgt` (`encoded.py` tokenises it). Every table is memory-mapped, and every pass over a
whole split reads it a batch at a time, so a corpus of millions of pairs never becomes Python objects.

Errors: the normal path lets `datasets`/Arrow do the work. Only when loading fails, or the loaded columns
show a problem (a null, a missing column, invalid UTF-8), do we scan the file once in Python to point at the
offending line, so large files stay fast and bad ones still get a precise `DataError`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pandas.errors import ParserWarning

from .config import DataConfig
from .data_scan import (
    DataError,
    check_header,
    first_bare_carriage_return,
    has_records,
    json_records,
    read_header,
    read_lines,
    scan_json,
    scan_table,
)

log = logging.getLogger(__name__)

__all__ = ["DataError", "iter_texts", "load_split", "sample_rows"]

SPLITS = ("train", "valid", "test")
_JSON_SUFFIXES = (".jsonl", ".json")
_TABLE_SEPARATORS = {".tsv": "\t", ".csv": ","}
# A line whose first value is `null` (after JSON whitespace): see `_has_null_record`.
_NULL_LINE = re.compile(rb"\n[ \t\r]*null")
_SCAN_BLOCK = 1 << 24  # bytes read at a time by `_has_null_record`
ROWS_PER_BATCH = 10_000  # rows per Arrow batch when a pass reads a whole split (about 1 MB)


# ----------------------------------------------------------------------------- loading


def load_split(cfg: DataConfig, split: str, cache_dir: str | Path, key: str = "", fix: str = "") -> datasets.Dataset:
    """Load `cfg.<split>` as a Dataset with exactly two string columns, `src` and `tgt`.

    `cache_dir` is the `datasets` cache: the Arrow tables (and later the encoded ones) live there. Errors name the
    setting `key` (by default `data.<split>`) and, where the file is missing, tell how to name another: `fix` (by
    default the config, or `--set data.<split>=PATH`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    source, key = getattr(cfg, split), key or f"data.{split}"
    fix = fix or f"fix the path in the config or pass --set {key}=PATH"
    if cfg.hub_name:
        return _load_hub(cfg, source, key, str(cache_dir))
    if not source.strip():
        need = {"train": "the pairs to train on", "valid": "the pairs validation scores (they choose best.pt and drive"
                " train.patience)", "test": "the pairs evaluate reads by default"}[split]
        raise DataError(f"{key} is empty: it names {need}; {fix}")
    if "{lang}" in source:
        return _load_text_pair(cfg, source, key, str(cache_dir), fix)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in _JSON_SUFFIXES and suffix not in _TABLE_SEPARATORS:
        raise DataError(
            f"{key}: {source!r} has an unsupported file type {suffix or '(none)'!r}; use .jsonl/.json, .tsv/.csv,"
            " a line-aligned text pair written as 'path/train.{lang}', or set data.hub_name"
        )
    _require_file(path, key, fix)
    if suffix in _JSON_SUFFIXES:
        return _load_json(cfg, path, str(cache_dir))
    return _load_table(cfg, path, _TABLE_SEPARATORS[suffix], str(cache_dir))


def _require_file(path: Path, key: str, fix: str) -> None:
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path} (relative paths start at {Path.cwd()}); {fix}")


def _load_builder(builder: str, path: Path, files: str, **options: Any) -> tuple[datasets.Dataset | None, str]:
    """Run a packaged `datasets` builder on one file, with its tables in `files` (`_file_cache`): (dataset, "") or
    (None, why it failed).

    `datasets` knows a local file by its path and modification time alone, so a file replaced by another with the
    same time (`cp -p`, `rsync -a`, `tar x`, `touch -r`) would be served from the old one's Arrow cache, and so would
    its encoded tables. Each file's tables therefore live under a folder named for its whole identity: size, times
    (ctime included, which no tool sets back) and inode."""
    try:
        with _builders_quiet():
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=files, **options)
    except Exception as e:  # noqa: BLE001 - any failure leads to the line scan below, which names the cause
        cause = e.__cause__ or e
        cache_dir = Path(files).parents[1]  # `files` is CACHE_DIR/files/<file> (`_file_cache`)
        if isinstance(cause, OSError) and str(cause.filename or "").startswith(str(cache_dir)):
            raise DataError(f"{path}: could not write its tables into the cache folder {cache_dir}: {cause.strerror or cause};"
                            " make it writable, or set data.cache_dir to another folder") from None
        return None, f"{type(cause).__name__}: {cause}"
    assert isinstance(ds, datasets.Dataset)
    return ds, ""


@contextlib.contextmanager
def _builders_quiet() -> Iterator[None]:
    """Silence the builders' own error log lines ("Failed to load JSON from file ... in row 1"): a failure is named
    below by the line scan, with the line number users see in their editor."""
    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _file_cache(path: Path, cache_dir: str) -> str:
    """The folder of `cache_dir` for one file's tables, named for the file's path and its whole identity (see
    `_load_builder`). Folders of the same path with an older identity hold tables of what the file was: removed."""
    st = path.stat()
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    identity = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}".encode()).hexdigest()[:12]
    files = Path(cache_dir) / "files"
    for stale in files.glob(f"{where}-*"):
        if stale.name != f"{where}-{identity}":
            shutil.rmtree(stale, ignore_errors=True)  # a process reading it keeps its open tables (unlinked, not gone)
    return str(files / f"{where}-{identity}")


def _load_json(cfg: DataConfig, path: Path, cache_dir: str) -> datasets.Dataset:
    files = _file_cache(path, cache_dir)
    read_in_python = Path(files) / _READ_IN_PYTHON
    earlier = _read_in_python_before(read_in_python)
    if earlier is not None and set(earlier["fields"]) == {cfg.src_lang, cfg.tgt_lang}:  # this very file (the folder is
        # its identity's) failed the reader before, and its records were checked to hold these two strings
        log.warning("%s: %s; reading only the fields %r and %r instead (in Python, cached)", path, earlier["why"], cfg.src_lang, cfg.tgt_lang)
        return _json_pairs_table(path, cfg, files)
    if _has_null_record(path):
        scan_json(path, cfg, nested=None)  # raises at the first record that is not an object
    # on_mixed_types=None: a record without a key becomes a null we can detect, not a JSON-string column.
    ds, why = _load_builder("json", path, files, on_mixed_types=None)
    pair = _to_pair(ds, cfg) if ds is not None else None
    why = why or _column_problem(pair, cfg)
    if why and not has_records(path):
        raise DataError(f"{path}: the file has no records (it is empty or blank); fill it or point the config at another file")
    if why:
        scan_json(path, cfg, nested=None if ds is None else "translation" in ds.column_names)
        if ds is None and next(json_records(path), None) is None:  # "[]"
            raise DataError(f"{path}: the file has no records; fill it or point the config at another file")
        if ds is None:  # every record has its two strings: the reader failed on another field (a mixed-type "id", say)
            log.warning("%s: %s; reading only the fields %r and %r instead (in Python, slower)", path, why, cfg.src_lang, cfg.tgt_lang)
            pairs = _json_pairs_table(path, cfg, files)
            _remember(read_in_python, json.dumps({"why": why, "fields": [cfg.src_lang, cfg.tgt_lang]}, ensure_ascii=False))
            return pairs
        raise DataError(f"{path}: could not be read as JSON records with {_langs(cfg)}: {why}")
    assert pair is not None
    return pair


# In a file's cache folder: the file's records need the Python reader (the text says why the Arrow reader failed).
_READ_IN_PYTHON = "read-in-python.txt"


def _read_in_python_before(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none (or a damaged one: the file is checked again)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("fields"), list) and "why" in record else None


def _remember(marker: Path, text: str) -> None:
    """A note in a file's cache folder that later starts read to skip a check or a reader: only a shortcut, so a
    folder that can't be written just means the work is done again."""
    with contextlib.suppress(OSError):
        marker.write_text(text, encoding="utf-8")


def _json_pairs_table(path: Path, cfg: DataConfig, files: str) -> datasets.Dataset:
    """The language pairs of every record, read in Python (`datasets` caches the table by these arguments)."""
    return datasets.Dataset.from_generator(
        _json_pairs, features=datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")}),
        gen_kwargs={"path": str(path), "src": cfg.src_lang, "tgt": cfg.tgt_lang}, cache_dir=files,
    )


def _json_pairs(path: str, src: str, tgt: str) -> Iterator[dict[str, str]]:
    """The two language strings of each record (nested under "translation" or flat), which `scan_json` checked."""
    for _, record in json_records(Path(path)):
        values = record["translation"] if "translation" in record else record
        yield {"src": values[src], "tgt": values[tgt]}


def _has_null_record(path: Path) -> bool:
    """True when a line of the file starts with `null`.

    pyarrow's JSON reader (pyarrow 26) crashes the process, a segfault rather than an exception, when a
    block it parses starts with the value null, and blocks start at line starts. A record must be an
    object anyway, so such a file skips the reader and goes to the line scan, which names the line.
    The file is read in blocks rather than memory-mapped: every page of a mapping that a scan touches
    counts in the process's resident memory, which for a 10M-pair file is gigabytes.
    """
    carry = b"\n"  # the file starts a line
    with open(path, "rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":  # a UTF-8 byte order mark comes before the first line
            f.seek(0)
        while block := f.read(_SCAN_BLOCK):
            data = carry + block
            if b"null" in data and _NULL_LINE.search(data):
                return True
            # A match can straddle two blocks only as a line start, whitespace and the start of "null".
            start = data.rfind(b"\n")
            rest = data[start + 1 :].lstrip(b" \t\r")
            carry = b"\n" + rest if start >= 0 and b"null".startswith(rest) else b""
    return False


def _load_table(cfg: DataConfig, path: Path, sep: str, cache_dir: str) -> datasets.Dataset:
    header = read_header(path, sep)
    check_header(path, header, cfg)
    # Every column as a string and no NA guessing: "NA", "null" and "" are text here, not missing values.
    # TSV is read without quote handling (QUOTE_NONE) because MT data has stray quotes; CSV keeps RFC 4180.
    options: dict[str, Any] = {
        "sep": sep,
        "header": 0,
        "names": (names := column_names(header)),
        "features": datasets.Features({name: datasets.Value("string") for name in names}),
        "na_filter": False,
        "quoting": csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL,
        # never a column as the index: where every row has a field more than the header, pandas would otherwise take
        # the first one for an index and shift the others onto the header's names (a scored `en zh score` corpus under
        # an `en zh` header read as zh -> score); here it warns instead, and the rows are scanned
        "index_col": False,
    }
    files = _file_cache(path, cache_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ParserWarning)
        ds, why = _load_builder("csv", path, files, **options)
    longer_rows = False
    for w in caught:
        if issubclass(w.category, ParserWarning):
            longer_rows = True
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if ds is None and not has_records(path, skip_lines=1):
        raise DataError(f"{path}: the file has a header but no rows; fill it or point the config at another file")
    if ds is None:
        scan_table(path, sep, header)
        kind = "TSV" if sep == "\t" else "CSV"
        raise DataError(f"{path}: could not be read as a {kind} file: {why}")
    pair = _to_pair(ds, cfg)
    assert pair is not None, "the header check guarantees both columns"
    # A row without its separator reads as an empty cell in its last column, like an empty text: files with empty
    # cells in any column are scanned for such rows, once per file (later starts read neither the scan nor the
    # columns again). Rows longer than the header make pandas warn, on every parse.
    checked = Path(files) / _ROWS_CHECKED
    if longer_rows or (not checked.is_file() and _has_empty_cell(ds)):
        try:
            scan_table(path, sep, header)  # raises at a row with fewer (or more) fields than the header
        except DataError:
            shutil.rmtree(files, ignore_errors=True)  # tables of rows cut to the header's fields: the next start reads again
            raise
    if not checked.is_file():
        _remember(checked, "every row has the header's fields\n")
    return pair


def column_names(header: list[str]) -> list[str]:
    """The header's names as the table's columns: a column without a name (a spreadsheet's trailing separator) is
    "column N", and a name seen before gets ".1", ".2", ... as pandas names them (the first keeps its name)."""
    names: list[str] = []
    for i, name in enumerate(header):
        name = name or f"column {i + 1}"
        base, k = name, 0
        while name in names:
            k += 1
            name = f"{base}.{k}"
        names.append(name)
    return names


# In a table file's cache folder: its rows were scanned, and every one has the header's number of fields.
_ROWS_CHECKED = "rows-checked.txt"


def _has_empty_cell(ds: datasets.Dataset) -> bool:
    """Whether any cell of any column is empty: a row one field short leaves its last column empty, and that may be a
    column other than the two languages (`en zh score` with a row `bye<TAB>0.8` reads as the pair bye -> 0.8)."""
    table = ds.data.table
    return any(pc.any(pc.equal(table.column(name), "")).as_py() for name in table.column_names)


def _load_text_pair(cfg: DataConfig, pattern: str, key: str, cache_dir: str, fix: str) -> datasets.Dataset:
    langs = (cfg.src_lang, cfg.tgt_lang)
    paths = [Path(pattern.replace("{lang}", lang)) for lang in langs]
    sides = []
    for path, lang in zip(paths, langs, strict=True):
        _require_file(path, f"{key} ({pattern!r} with {{lang}}={lang!r})", fix)
        if (line := first_bare_carriage_return(path)) is not None:
            raise DataError(
                f"{path}, line {line}: a carriage return (\\r) inside the line, which the text reader takes for a line"
                " break, so the two files' lines would no longer pair up; remove it, e.g. `sed -i 's/\\r$//; s/\\r/ /g' FILE`"
            )
        ds, why = _load_builder("text", path, _file_cache(path, cache_dir), encoding="utf-8-sig")  # an editor's byte order mark is not text
        if ds is None:
            for _ in read_lines(path):  # raises on the first line that is not UTF-8
                pass
            if path.stat().st_size == 0:
                raise DataError(f"{path}: the file is empty; fill it or point {key} at other files")
            raise DataError(f"{path}: could not be read as a text file: {why}")
        sides.append(ds)
    if len(sides[0]) != len(sides[1]):
        raise DataError(
            f"{key}: the line-aligned files differ in length: {paths[0]} has {len(sides[0]):,} lines,"
            f" {paths[1]} has {len(sides[1]):,}; each line must be the translation of the same line in the other file"
        )
    src, tgt = (ds.rename_column("text", name) for ds, name in zip(sides, ("src", "tgt"), strict=True))
    return datasets.concatenate_datasets([src, tgt], axis=1)


def _load_hub(cfg: DataConfig, split_name: str, key: str, cache_dir: str) -> datasets.Dataset:
    where = f"hub dataset {cfg.hub_name!r} (config {cfg.hub_config or 'default'!r}, split {split_name!r} from {key})"
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config or None, split=split_name, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - network, name and split errors all get the same advice
        raise DataError(
            f"could not load {where}: {type(e).__name__}: {e}. Check data.hub_name, data.hub_config and {key}"
            f" on https://huggingface.co/datasets/{cfg.hub_name}, and the network (offline, the dataset must"
            f" already be in {cache_dir})"
        ) from e
    assert isinstance(ds, datasets.Dataset)
    pair = _to_pair(ds, cfg)
    why = _column_problem(pair, cfg) if pair is not None else f"columns are {', '.join(ds.column_names)}"
    if why:
        raise DataError(f"{where}: expected the translation schema with {_langs(cfg)}: {why}")
    assert pair is not None
    return pair


# ----------------------------------------------------------------------------- columns


def _langs(cfg: DataConfig) -> str:
    return f"keys {cfg.src_lang!r} (data.src_lang) and {cfg.tgt_lang!r} (data.tgt_lang)"


def _to_pair(ds: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset | None:
    """Select the two language columns as `src`/`tgt` (cheap Arrow ops); None when one is absent."""
    langs = [cfg.src_lang, cfg.tgt_lang]
    nested = ds.features.get("translation")
    if isinstance(nested, datasets.Translation):
        nested = dict.fromkeys(nested.languages)
    if isinstance(nested, dict):  # the HF translation schema: one struct column
        if not all(lang in nested for lang in langs):
            return None
        ds = ds.select_columns(["translation"]).flatten()
        names = [f"translation.{lang}" for lang in langs]
    elif all(lang in ds.column_names for lang in langs):  # flat records / table columns
        names = langs
    else:
        return None
    return ds.select_columns(names).rename_columns(dict(zip(names, ["src", "tgt"], strict=True)))


def _column_problem(pair: datasets.Dataset | None, cfg: DataConfig) -> str:
    """Why the `src`/`tgt` columns are unusable ("" if they are fine), checked in Arrow without Python loops."""
    if pair is None:
        return f"no {_langs(cfg)} in the records"
    for name, lang in (("src", cfg.src_lang), ("tgt", cfg.tgt_lang)):
        column = pair.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            return f"values of {lang!r} are {column.type}, not strings"
        if column.null_count:
            return f"{column.null_count} records have no value for {lang!r}"
        try:
            column.validate(full=True)  # the JSON reader does not check UTF-8; a full validation does
        except pa.ArrowInvalid:
            return f"values of {lang!r} are not valid UTF-8"
    return ""


def sample_rows(n_rows: int, n_sample: int, seed: int) -> np.ndarray | None:
    """A boolean mask (n_rows,) with `n_sample` rows drawn at random, or None (every row) when that is all."""
    if n_sample <= 0 or n_sample >= n_rows:
        return None
    mask = np.zeros(n_rows, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_rows, n_sample, replace=False)] = True
    return mask


def iter_texts(ds: datasets.Dataset, column: str, rows: np.ndarray | None = None) -> Iterator[str]:
    """The strings of `column` in row order; only the rows set in the boolean mask `rows` (N,) when given.

    Read from the Arrow table a batch at a time, so memory stays at one batch of strings whatever the size of
    the split (iterating a Dataset row by row is as lean but builds a dict per row, which is slow).
    """
    batches = ds.with_format("arrow", columns=[column]).iter(ROWS_PER_BATCH)
    for start, batch in zip(range(0, len(ds), ROWS_PER_BATCH), batches, strict=True):
        texts = batch.column(column)
        if rows is not None:
            texts = texts.filter(pa.array(rows[start : start + len(texts)]))
        yield from texts.to_pylist()
