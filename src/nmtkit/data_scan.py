"""Line-by-line scans that find the exact line of a bad data file.

`data.py` lets `datasets`/Arrow load files; only when that fails, or the loaded columns show a problem,
does it call these to name the offending file and line in a `DataError`.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from .config import DataConfig


class DataError(ValueError):
    """A problem with the data a config points at; the message names the file, line, key or value, and the fix."""


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each line; raises DataError at the first line that is not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}, line {number}: invalid UTF-8 at byte {e.start} of the line ({e.reason});"
                    " re-encode the file as UTF-8, e.g. `iconv -f GB18030 -t UTF-8`"
                ) from None


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """("line N" or "record N", parsed record) for a JSON Lines file or a JSON array; DataError on bad syntax."""
    with open(path, "rb") as f:
        is_array = f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")
    if not is_array:
        for number, text in read_lines(path):
            if number == 1:
                text = text.removeprefix("\ufeff")  # a byte order mark, which the Arrow reader skips too
            if text.strip():
                try:
                    yield f"line {number}", json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno});"
                        " each line must be one JSON object"
                    ) from None
        return
    raw = path.read_bytes()
    try:
        records = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: invalid UTF-8 ({e.reason}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    for number, record in enumerate(records, start=1):
        yield f"record {number}", record


def scan_json(path: Path, cfg: DataConfig, nested: bool | None) -> None:
    """Raise DataError at the first record without a string for each language.

    `nested`: True = under "translation", False = flat, None = whichever that record uses.
    """
    for where, record in json_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{path}, {where}: expected a JSON object, got {type(record).__name__}")
        is_nested = nested if nested is not None else "translation" in record
        values = record.get("translation") if is_nested else record
        prefix = "translation." if is_nested else ""
        if not isinstance(values, dict):
            raise DataError(
                f"{path}, {where}: no 'translation' object (keys present: {', '.join(record) or 'none'});"
                ' use {"translation": {...}} on every line or flat records on every line'
            )
        for lang, key in ((cfg.src_lang, "data.src_lang"), (cfg.tgt_lang, "data.tgt_lang")):
            value = values.get(lang)
            if value is None and lang in values:
                raise DataError(f"{path}, {where}: '{prefix}{lang}' is null, expected a string; fill it or drop the record")
            if value is None:
                present = ", ".join(f"{prefix}{k}" for k in values) or "none"
                raise DataError(
                    f"{path}, {where}: missing key '{prefix}{lang}' (keys present: {present});"
                    f" add it, drop the record, or change {key}"
                )
            if not isinstance(value, str):
                shown = reprlib.repr(value)  # a whole column of a file in another layout can be megabytes
                raise DataError(f"{path}, {where}: '{prefix}{lang}' is {type(value).__name__} {shown}, expected a string")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's escapes can spell half of a surrogate pair, which no UTF-8 holds
                raise DataError(
                    f"{path}, {where}: '{prefix}{lang}' holds a lone surrogate ({value[e.start]!r} at character"
                    f" {e.start + 1}), half of a character cut in two (often an emoji); remove it or restore the character"
                ) from None


def read_header(path: Path, sep: str) -> list[str]:
    for _, text in read_lines(path):
        try:
            # a byte-order mark (spreadsheets' "CSV UTF-8" writes one) is not part of the first column's name
            return next(csv.reader([text.removeprefix("\ufeff")], delimiter=sep))
        except csv.Error as e:  # a bare carriage return inside the line, or a field over csv's size limit
            raise DataError(f"{path}, line 1: could not read the header row ({e}); it must be one line of column names") from None
    raise DataError(f"{path}: the file is empty; it needs a header row naming a column per language")


def check_header(path: Path, header: list[str], cfg: DataConfig) -> None:
    for lang, key in ((cfg.src_lang, "data.src_lang"), (cfg.tgt_lang, "data.tgt_lang")):
        if lang not in header:
            raise DataError(
                f"{path}, line 1: the header has no column {lang!r} (columns: {', '.join(header)});"
                f" name the columns {cfg.src_lang!r} and {cfg.tgt_lang!r}, or change {key}"
            )


_NO_FIELD_LIMIT = 2**31 - 1  # the largest field size csv takes on every platform (a C long)


def scan_table(path: Path, sep: str, header: list[str]) -> None:
    """Raise DataError at the first line that is not UTF-8 or has the wrong number of fields."""
    for _ in read_lines(path):
        pass
    # Literal: the csv.QUOTE_* values, as the type hints spell them
    quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    what = "tab" if sep == "\t" else "separator or quote"
    limit = csv.field_size_limit(_NO_FIELD_LIMIT)  # csv's default, 131,072 characters, is not ours: pandas read them
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=sep, quoting=quoting)
        start = 1  # the line the next record starts on: a quoted field may hold line breaks (or never close)
        try:
            for row in reader:
                if row and len(row) != len(header):
                    lines = f"line {start}" if start == reader.line_num else f"lines {start}-{reader.line_num}, one record"
                    spans = quoting != csv.QUOTE_NONE and start != reader.line_num  # TSV quotes are text
                    opened = " (a quote opened there never closes)" if spans and _quotes(path, start, reader.line_num) % 2 else ""
                    fault = "stray" if len(row) > len(header) else "missing"
                    raise DataError(
                        f"{path}, {lines}{opened}: {len(row)} fields, the header has {len(header)};"
                        f" check for a {fault} {what} in the text"
                    )
                start = reader.line_num + 1
        except csv.Error as e:  # whatever else csv refuses, named at its line
            raise DataError(f"{path}, line {reader.line_num}: {e}") from None
        finally:
            csv.field_size_limit(limit)


def _quotes(path: Path, first: int, last: int) -> int:
    """The double quotes on lines first..last (1-based): an odd count is a quoted field left open."""
    with open(path, encoding="utf-8", newline="") as f:
        return sum(line.count('"') for line in itertools.islice(f, first - 1, last))


def has_records(path: Path, skip_lines: int = 0) -> bool:
    """Whether the file has a non-blank line after its first `skip_lines` (a header); a byte order mark is no content."""
    return any(text.removeprefix("\ufeff").strip() for number, text in read_lines(path) if number > skip_lines)


_BARE_CR = re.compile(rb"\r(?!\n)")
_SCAN_BLOCK = 1 << 24  # bytes read at a time (blocks, not a memory map: mapped pages would count in the process's RSS)


def first_bare_carriage_return(path: Path) -> int | None:
    """The 1-based line of the first carriage return that does not end a line, in a file whose lines end with line
    feeds; None when there is none.

    Text files are read with universal newlines, where a bare carriage return also breaks the line: in a line-aligned
    pair, stray ones shift every later pair. Files that end every line with a bare carriage return (no line feed at all)
    split alike on both sides and pass, as does one at the very end of the file.
    """
    first, lines_before, has_line_feed, pending = None, 0, False, False
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BLOCK):
            if pending and first is None and not block.startswith(b"\n"):
                first = lines_before + 1  # the previous block ended with this line's carriage return
            if first is None and (found := _BARE_CR.search(block)) is not None and found.start() < len(block) - 1:
                first = lines_before + block.count(b"\n", 0, found.start()) + 1
            pending = block.endswith(b"\r")
            n = block.count(b"\n")
            lines_before += n
            has_line_feed = has_line_feed or n > 0
            if first is not None and has_line_feed:
                break
    return first if has_line_feed else None
