"""Checkpoint averaging: `nmtkit average RUN_DIR --last N` writes the mean of the newest N saves' weights.

Averaging the weights of the last few checkpoints of a run (Vaswani et al., 2017, averaged the last 5 or 20)
usually gives a model a little better than any one of them, at no training cost. The sum is taken in fp32 whatever
the checkpoints' dtype, one checkpoint at a time, so memory holds two models, not N. The result carries config,
tokenizer and format version like any checkpoint, so `Translator.from_checkpoint` and `nmtkit evaluate` load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_dir,
    config_differences,
    load_checkpoint,
    step_files,
    weights_digest,
    write_atomic,
)


@dataclass
class AveragedCheckpoint:
    path: Path  # the file written
    steps: list[int]  # the steps averaged, oldest first
    files: list[Path]


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-N.pt in RUN_DIR/checkpoints, oldest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints directory: {directory} not found; give a run directory (train.run_dir)")
    return step_files(directory)


DEFAULT_LAST = 5  # without --last: the newest saves, up to this many


def newest_checkpoints(run_dir: str | Path, last: int | None) -> list[tuple[int, Path]]:
    """The newest `last` step checkpoints, oldest first; CheckpointError when there are fewer. None: as many as the run
    kept (train.keep_checkpoints, 3 by default), up to DEFAULT_LAST."""
    found = step_checkpoints(run_dir)
    if last is None:
        if not found:
            raise CheckpointError(f"no step-N.pt checkpoint in {checkpoint_dir(run_dir)}; has training saved one yet?")
        last = min(DEFAULT_LAST, len(found))
    if last < 1:
        raise CheckpointError(f"--last must be at least 1, got {last}")
    if len(found) < last:
        names = ", ".join(p.name for _, p in found) or "none"
        raise CheckpointError(
            f"asked to average the last {last} checkpoints, but {checkpoint_dir(run_dir)} has only {len(found)} ({names}); "
            "lower --last, or keep more saves with train.keep_checkpoints"
        )
    return found[-last:]


def _differences(first: dict[str, Any], other: dict[str, Any], names: tuple[str, str]) -> list[str]:
    """What keeps two checkpoints' weights from being averaged: config sections, tokenizer, parameter names/shapes."""
    problems = config_differences(first["config"], other["config"], names)
    if first["tokenizer"] != other["tokenizer"]:
        problems.append("the tokenizer differs")
    a, b = first["model"], other["model"]
    if set(a) != set(b):
        problems.append(f"parameter names differ: {', '.join(sorted(set(a) ^ set(b))[:5])}")
    problems += [
        f"{name}: shape {tuple(a[name].shape)} vs {tuple(b[name].shape)}"
        for name in sorted(set(a) & set(b))
        if a[name].shape != b[name].shape
    ]
    return problems


def average_weights(files: list[Path]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The newest file's state (for its config and tokenizer) and the mean weights of all `files`.

    Floating-point tensors are summed in fp32 and cast back to their own dtype; any others (integer buffers)
    must be equal and are kept.
    """
    first = load_checkpoint(files[0])
    sums = {name: t.float().clone() if t.is_floating_point() else t for name, t in first["model"].items()}
    state = first
    for file in files[1:]:
        state = load_checkpoint(file)
        problems = _differences(first, state, (files[0].name, file.name))
        problems += [
            f"{n}: non-float tensor differs"
            for n, t in state["model"].items()
            if not t.is_floating_point() and not torch.equal(t, sums[n])
        ]
        if problems:
            raise CheckpointError(f"can't average {files[0].name} with {file.name}:\n  " + "\n  ".join(problems))
        for name, t in state["model"].items():
            if t.is_floating_point():
                sums[name] += t.float()
    dtypes = {name: t.dtype for name, t in first["model"].items()}
    mean = {name: (s / len(files)).to(dtypes[name]) if s.is_floating_point() else s for name, s in sums.items()}
    return state, mean


def average_checkpoints(run_dir: str | Path, last: int | None = None, out: str | Path | None = None) -> AveragedCheckpoint:
    """Average the newest `last` step checkpoints of a run (None: `newest_checkpoints`' default) into `out` (default
    RUN_DIR/checkpoints/averaged.pt)."""
    chosen = newest_checkpoints(run_dir, last)
    files = [p for _, p in chosen]
    newest, weights = average_weights(files)
    state = {
        "format_version": FORMAT_VERSION,
        "config": newest["config"],
        "tokenizer": newest["tokenizer"],
        "model": weights,
        "step": newest.get("step", chosen[-1][0]),
        "averaged_steps": [step for step, _ in chosen],
        "model_sha256": weights_digest(weights),
    }
    path = Path(out) if out is not None else checkpoint_dir(run_dir) / "averaged.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(state, path)
    return AveragedCheckpoint(path, [step for step, _ in chosen], files)
