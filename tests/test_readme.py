"""The README's Python API walkthrough runs as written (against a freshly trained tiny run)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

MARKER = "<!-- tested by tests/test_readme.py -->"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.split(MARKER, 1)[1]
    match = re.search(r"```python\n(.*?)```", after, flags=re.S)
    assert match, "the README's tested example must be a ```python block after the marker"
    return match.group(1)


def test_readme_python_example_runs_as_written(trained_run: Path, monkeypatch, tmp_path: Path, capsys) -> None:
    # The example loads "checkpoints/tatoeba-en-zh-tiny" relative to the working directory.
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "tatoeba-en-zh-tiny").symlink_to(trained_run, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "CrossEntropyLoss" in out and "reference mean loss" in out
