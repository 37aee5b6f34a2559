"""The learning rate as a pure function of the step: nothing to save, nothing to drift on resume."""

from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then the configured decay."""
    step = max(1, step)
    warmup = cfg.warmup_steps
    if step <= warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "inverse_sqrt":
        # continuous with warmup at step == warmup; without warmup it is lr / sqrt(step)
        return max(cfg.min_lr, cfg.lr * math.sqrt(max(1, warmup) / step))
    # cosine from lr at the end of warmup down to min_lr at max_steps (config validation requires max_steps)
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
