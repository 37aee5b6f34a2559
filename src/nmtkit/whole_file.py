"""Small files written whole: to a temporary name beside the file, then renamed into place, so that a process stopped
half-way (a signal, a full disk) leaves the old file or none, never half of the new one. Checkpoints have their own,
fsynced version (`checkpoint.write_atomic`)."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, data: bytes | str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    if isinstance(data, str):
        partial.write_text(data, encoding="utf-8")
    else:
        partial.write_bytes(data)
    os.replace(partial, path)
