"""What `nmtkit translate` reads: sentences from the command line, a file or stdin, as strict UTF-8, one per line.

Lines end at a line feed only (as `wc -l` counts them, and as the training data's text files are checked): a stray
carriage return inside a line must not split it and shift the references. stdin comes in chunks of the lines that
have arrived, so a pipe or a terminal gets each translation as soon as its line is in, while input that is all there
at once still fills whole chunks of batches.
"""

from __future__ import annotations

import os
import select
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError


def read_lines(path: str, flag: str) -> list[str]:
    """Every line of a file ('-': of stdin), decoded strictly; a byte order mark is dropped."""
    name = "stdin" if path == "-" else path
    try:
        if path == "-" and sys.stdin is None:  # started with stdin closed (`<&-`, some service managers): no lines
            data = b""
        elif path == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            data = stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        else:
            data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{flag}: file not found: {path}"]) from None
    except OSError as e:
        raise ConfigError([f"{flag}: cannot read {path} ({e.strerror or e})"]) from None
    raw = data.split(b"\n")
    if raw[-1] == b"":  # the last line's own line feed
        raw.pop()
    lines, error = _decode_lines(raw, flag, name, first_line=1)
    if error is not None:
        raise error
    return lines


def stdin_chunks(max_lines: int, flag: str = "--input") -> Iterator[list[str]]:
    """stdin's lines in chunks of at most `max_lines`: from a pipe or a terminal, whatever has arrived once at least
    one line has (read with os.read and select, below Python's buffered reader, whose buffer select cannot see); from
    a file (`< FILE`), or where select can't watch stdin, all of it, cut into chunks as a file's lines are."""
    try:
        fd = sys.stdin.fileno()
        streams = not stat.S_ISREG(os.fstat(fd).st_mode)
        if streams:
            select.select([fd], [], [], 0)  # raises where stdin can't be watched (Windows pipes and consoles)
    except (AttributeError, OSError, ValueError):  # no descriptor (a replaced sys.stdin)
        streams = False
    if not streams:
        yield from chunked(read_lines("-", flag), max_lines)
        return
    pending, ready, first_line = bytearray(), list[bytes](), 1
    while True:
        if ready and (len(ready) >= max_lines or not select.select([fd], [], [], 0)[0]):
            chunk, ready = ready[:max_lines], ready[max_lines:]
            lines, error = _decode_lines(chunk, flag, "stdin", first_line)
            if lines:
                yield lines  # the lines before a bad one are still translated
            if error is not None:
                raise error
            first_line += len(chunk)
            continue
        try:
            data = os.read(fd, 1 << 16)
        except OSError as e:
            raise ConfigError([f"{flag}: cannot read stdin ({e.strerror or e})"]) from None
        if not data:
            break
        pending += data
        if b"\n" in data:  # split only when a line ended: a long line arriving in pieces is not copied again and again
            *complete, rest = bytes(pending).split(b"\n")
            ready += complete
            pending = bytearray(rest)
    ready += [bytes(pending)] if pending else []
    for i in range(0, len(ready), max_lines):
        lines, error = _decode_lines(ready[i : i + max_lines], flag, "stdin", first_line + i)
        if lines:
            yield lines
        if error is not None:
            raise error


def chunked(lines: list[str], size: int) -> Iterator[list[str]]:
    return (lines[i : i + size] for i in range(0, len(lines), size))


def _decode_lines(raw: list[bytes], flag: str, name: str, first_line: int) -> tuple[list[str], ConfigError | None]:
    """The lines decoded up to the first that is not UTF-8, and the error naming that one (None if all are)."""
    lines: list[str] = []
    for number, line in enumerate(raw, first_line):
        try:
            text = line.decode("utf-8")  # (utf-8-sig would count the error's byte after the mark)
            if number == 1:
                text = text.removeprefix("\ufeff")  # an editor's byte order mark is no text
        except UnicodeDecodeError as e:
            where = name if name == "stdin" else f"{flag}: {name}"
            return lines, ConfigError([f"{where}, line {number} is not UTF-8 text (byte {e.start} of the line)"])
        lines.append(text.removesuffix("\r"))
    return lines, None


def checked_arguments(values: list[str], name: str) -> list[str]:
    """Command-line text, refused where it is not UTF-8: Python keeps such bytes as lone surrogates, which neither the
    tokenizer nor a JSON line can hold."""
    for i, value in enumerate(values, 1):
        if any("\udc80" <= c <= "\udcff" for c in value):
            raise ConfigError([f"{name} {i} on the command line is not UTF-8 text: {value.encode('utf-8', 'replace')!r}"])
    return list(values)


def check_writable(path: str, flag: str) -> None:
    """Refuse an output file that could not be written (its folders are made when it is written)."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError([f"{flag}: {path} is a folder; give a file name"])
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError([f"{flag}: cannot write {path}: {existing} is not a folder"])
    if not os.access(existing, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError([f"{flag}: cannot write {path} (permission denied)"])
