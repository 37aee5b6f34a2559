"""Device and precision choices that change speed without changing results."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_a_cpu_runtime_flushes_denormal_floats_to_zero() -> None:
    # In a fresh interpreter, so the process-wide flag set by other tests cannot hide a missing call.
    code = (
        "import torch\n"
        "tiny = torch.tensor([1e-39])\n"  # below fp32's smallest normal (1.18e-38): a denormal
        "before = (tiny * 1.0).item()\n"
        "from nmtkit.device import choose_runtime\n"
        "choose_runtime('cpu', 'fp32')\n"
        "after = (tiny * 1.0).item()\n"
        "print(before, after)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after = map(float, out)
    if before == 0.0:
        pytest.skip("this CPU or torch build already flushes denormals")
    assert after == 0.0, f"a denormal survived a CPU runtime: {after}"


def test_combining_marks_and_zero_width_characters_take_no_terminal_column() -> None:
    """Hindi's vowel signs, Thai's tone marks and a zero-width joiner sit on the character before them: counted as a
    column each, they pushed the token table's later columns out of line."""
    from nmtkit.show import display_width

    # नमस्ते: four consonants, a virama and a vowel sign (marks); कि's vowel sign is a spacing mark (a column)
    assert [display_width(t) for t in ("नमस्ते", "ที่", "कि", "猫", "x", "a\u200db")] == [4, 1, 2, 2, 1, 2]

