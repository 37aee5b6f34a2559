"""Helpers shared by the reliability tests: config files, the CLI in-process and as a subprocess, and
comparisons of saved weights.

(Not a conftest.py: a second conftest module would shadow `tests/conftest.py`, which the tests import
helpers from.)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_tree
from nmtkit.cli import main


@pytest.fixture(autouse=True)
def one_torch_thread(one_thread: None) -> None:
    """Autouse wherever imported: conftest's `one_thread` for every test of the module. The tiny models train fastest
    on one thread; with two, a step can take 100 times longer while another process keeps the cores busy."""


def write_config(path: Path, corpus: dict[str, Path], run_dir: Path, **sections: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_tree(corpus, run_dir, **sections), allow_unicode=True), encoding="utf-8")
    return path


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """`nmtkit.cli.main(argv)` with stdout and stderr captured; the nmtkit logger is put back afterwards
    (`main` points it at the stderr of the moment)."""
    logger = logging.getLogger("nmtkit")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    return code, out.getvalue(), err.getvalue()


def subprocess_env() -> dict[str, str]:
    """The environment for `python -m nmtkit` children: one thread each, so two can run side by side."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(config: Path, *overrides: str) -> list[str]:
    argv = [sys.executable, "-m", "nmtkit", "train", "--config", str(config)]
    for text in overrides:
        argv += ["--set", text]
    return argv


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.005) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def saved_steps(run_dir: Path) -> list[int]:
    """The steps of the step-N.pt files in a run directory, oldest first."""
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


def last_pt_step(run_dir: Path) -> int:
    """The step of the step-N.pt file that last.pt is a link to; 0 before the first save. A save writes step-N.pt
    first and then re-links last.pt, so a step file alone does not mean last.pt has moved on."""
    last = run_dir / "checkpoints" / "last.pt"
    for step in reversed(saved_steps(run_dir)):
        try:
            if os.path.samefile(last, run_dir / "checkpoints" / f"step-{step:06d}.pt"):
                return step
        except FileNotFoundError:  # last.pt not written yet, or the step file rotated away meanwhile
            continue
    return 0


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys and shapes."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
