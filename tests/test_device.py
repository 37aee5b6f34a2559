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
