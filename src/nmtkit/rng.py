"""Seeding and the RNG states a checkpoint carries (Python, NumPy, torch CPU and CUDA)."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """All generator states as tensors and plain values, so they load with weights_only=True."""
    # the global generator is an MT19937, whose legacy state is the tuple (its type hints also allow a dict)
    kind, keys, *rest = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), *rest),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        # one state per GPU the saving process saw: a machine with fewer takes the first ones
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])
