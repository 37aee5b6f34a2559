"""One optimizer step, and the guard against non-finite gradients around it.

`train_step` runs forward, backward, clipping and AdamW for one step and skips a non-finite update on the
device. `SkippedSteps` reads those skip flags back a step late (so a GPU never waits for them) and counts
them into the training state; too many in a row end the run with `DivergenceError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .batching import Batch
from .config import Config
from .device import Runtime

if TYPE_CHECKING:
    from .resume import TrainState

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


def make_optimizer(model: nn.Module, cfg: Config, runtime: Runtime) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not biases, norms or embeddings' padding)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": ps, **settings} for ps, settings in zip((decay, no_decay), _group_settings(cfg), strict=True)]
    # the fused kernel updates every parameter in one pass, on CUDA and on CPU alike
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)


def _group_settings(cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdamW's settings of the config for make_optimizer's two groups: matrices, then the rest (no weight decay)."""
    shared = {"betas": tuple(cfg.train.betas), "eps": cfg.train.eps}
    return {"weight_decay": cfg.train.weight_decay, **shared}, {"weight_decay": 0.0, **shared}


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, cfg: Config) -> list[str]:
    """Set the config's weight decay, betas and eps on an optimizer that make_optimizer made and a checkpoint's state
    then overwrote (its param groups carry the settings of the run that saved it); returns what changed, as
    'train.key: old -> new'. The learning rate is the schedule's, set at every step."""
    changes: dict[str, str] = {}
    for group, settings in zip(optimizer.param_groups, _group_settings(cfg), strict=True):
        for key, value in settings.items():
            old = tuple(group[key]) if isinstance(group[key], (list, tuple)) else group[key]
            if old != value:  # betas and eps are in both groups: named once
                changes[key] = f"train.{key}: {old!r} -> {value!r}"
                group[key] = value
    return list(changes.values())


def train_step(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: list[Batch],
    n_tokens: int,
    runtime: Runtime,
    lr: float,
    clip_norm: float,
    *,
    world_size: int = 1,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over `batches` (accumulated micro-batches).

    The summed loss is divided by `n_tokens`, the target tokens of the whole step on all ranks, so
    accumulation and N ranks train like one batch N times larger (DDP averages gradients over
    ranks, hence the factor `world_size`). Returns the summed loss and, with `check_finite`, whether
    the gradient norm was non-finite, both as device tensors: the caller decides when to read them.
    A non-finite step's update is skipped on the device (the fused AdamW kernel's `found_inf` input,
    the same mechanism the fp16 grad scaler uses), so the step never waits for the host; reading the
    flag back every step cost 10% of a compiled GPU step. With fp16 the grad scaler skips such a step and halves
    its scale, which is how it finds its scale from 2**16; the flag marks only overflows that leave the scale at 1 or
    less, where fp16 gradients overflow unscaled, so that a run whose fp16 loss stays non-finite stops like any other
    (after ~16 halvings and then `max_bad_steps` in a row) and the scaler's search never does.
    """
    total = torch.zeros((), device=runtime.device)
    for i, batch in enumerate(batches):
        is_last = i == len(batches) - 1
        # DDP all-reduces gradients in backward; only the last micro-batch needs to
        sync = contextlib.nullcontext() if is_last or not hasattr(objective, "no_sync") else cast(DDP, objective).no_sync()
        with sync:
            with runtime.compute():
                loss = objective(batch.src, batch.tgt_in, batch.tgt_out)  # summed over target tokens, fp32
            scaler.scale(loss * (world_size / n_tokens)).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), clip_norm if clip_norm > 0 else math.inf)
    is_bad = ~torch.isfinite(grad_norm) if check_finite else None
    # fp16's grad scaler found the same non-finite values in unscale_: it skips that update itself
    skip_here = is_bad is not None and not scaler.is_enabled()
    skip_on_device = skip_here and optimizer.defaults.get("fused", False)
    if skip_here and not skip_on_device and bool(is_bad):  # other optimizers: the host decides
        optimizer.zero_grad(set_to_none=True)
        return total, is_bad
    for group in optimizer.param_groups:
        group["lr"] = lr
    # read by the fused kernel: 1 skips the update; skip_on_device implies is_bad. Not in Optimizer's type hints: torch
    # reads it with getattr (its own GradScaler ignores the same error)
    optimizer.found_inf = cast(torch.Tensor, is_bad).float() if skip_on_device else None  # type: ignore[attr-defined]
    scaler.step(optimizer)
    scaler.update()
    if is_bad is not None and scaler.is_enabled():  # the scale after this step's update (a device tensor: no sync)
        is_bad = is_bad & (cast(torch.Tensor, scaler._get_scale_async()) <= 1.0)
    optimizer.found_inf = None  # type: ignore[attr-defined]
    optimizer.zero_grad(set_to_none=True)
    return total, is_bad


class LateFlag:
    """A device bool read back one step later without stalling the device: copied to pinned host memory
    behind a CUDA event, so reading it waits only for the step that produced it (on CPU it is just read)."""

    def __init__(self, flag: torch.Tensor) -> None:
        self.event = None
        if flag.device.type == "cuda":
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flag

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


class SkippedSteps:
    """The non-finite flags of finished steps, read back a step late, and the counts they make in `state`
    (`skipped_steps`, `bad_steps_in_a_row`). `max_bad_steps` in a row raise `DivergenceError`, which names
    `last_checkpoint` as untouched: the loop settles every flag before it writes one."""

    def __init__(self, state: TrainState, max_bad_steps: int, last_checkpoint: Path) -> None:
        self.state = state
        self.max_bad_steps = max_bad_steps
        self.last_checkpoint = last_checkpoint
        self.unread: list[tuple[int, LateFlag, int]] = []  # (step, non-finite flag, the step's target tokens)

    def add(self, step: int, is_bad: torch.Tensor, tokens: int) -> None:
        self.unread.append((step, LateFlag(is_bad), tokens))

    def settle(self, keep_newest: bool = False) -> int:
        """Reads the flags of finished steps (all, or all but the newest, which the device may still be
        computing) and counts them. Returns the target tokens of the skipped ones among them."""
        state, skipped_tokens = self.state, 0
        while len(self.unread) > (1 if keep_newest else 0):
            step, flag, tokens = self.unread.pop(0)
            if not flag.read():
                state.bad_steps_in_a_row = 0
                continue
            state.skipped_steps += 1
            state.bad_steps_in_a_row += 1
            skipped_tokens += tokens
            log.warning("step %d: non-finite gradient, update skipped (%d in a row, %d in total)", step, state.bad_steps_in_a_row, state.skipped_steps)
            if state.bad_steps_in_a_row >= self.max_bad_steps:
                raise DivergenceError(
                    f"training diverged: {state.bad_steps_in_a_row} steps in a row with non-finite gradients "
                    f"(train.max_bad_steps={self.max_bad_steps}) at step {step - 1}. The last checkpoint, "
                    f"{self.last_checkpoint}, is untouched; lower train.lr or raise train.warmup_steps and resume"
                )
        return skipped_tokens
