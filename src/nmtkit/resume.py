"""Where a run is and how a restart finds its place again.

`TrainState` is saved in every checkpoint. A restart rebuilds the epoch's batch plan (`epoch_batches`, a pure
function of the lengths, the plan keys and the epoch), restores the weights, optimizer, grad scaler and RNG states
from `last.pt`, and skips the batches the interrupted epoch already trained on. A config whose weight sections
changed is refused; a changed batch plan or changed data is followed, with a warning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import make_batches
from .checkpoint import CheckpointError, checkpoint_dir, config_differences, load_checkpoint, same_path
from .config import Config, TrainConfig
from .model import Transformer
from .rng import restore_rng_states
from .step import apply_optimizer_settings
from .tokenizer import Tokenizer
from .translator import check_model_matches, tokenizer_from_state

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    tokens_seen: int = 0  # non-pad target tokens trained on
    best_valid_loss: float = math.inf
    evals_without_improvement: int = 0  # scheduled evaluations (every train.eval_every steps) since the best of them
    best_scheduled_loss: float = math.inf  # the best of those (a stop's evaluation may make best.pt, not patience's best)
    elapsed_s: float = 0.0  # training wall time over all sessions
    skipped_steps: int = 0  # steps skipped for a non-finite gradient, in total
    oom_skipped: int = 0  # batches skipped because they ran out of memory
    bad_steps_in_a_row: int = 0
    # the log window at the save (summed over ranks): a log line after a resume covers the steps before it too
    window_loss: float = 0.0
    window_tokens: int = 0
    # what the run trains and validates on, to notice files changed at the same path on resume (empty: not recorded)
    train_data_digest: str = ""  # the training pairs' lengths, in order: what the batch plan is made of (their ids
    # would tell more, but reading a 10M-pair table's ids brings ~1 GB of its pages into memory)
    valid_data_digest: str = ""  # the validation pairs' piece ids


# Train keys that decide the batch plan (`make_batches`). They may change on resume (a smaller max_tokens after
# running out of memory, say), but then the interrupted epoch's plan changes too, and its position must follow.
_PLAN_KEYS = ("max_tokens", "max_tokens_counts", "seed")


def epoch_batches(tc: TrainConfig, src_lens: np.ndarray, tgt_lens: np.ndarray, epoch: int) -> list[np.ndarray]:
    """The training batches of `epoch` under the plan keys of `tc` (the training loop's, the benchmark's, a resume's)."""
    return make_batches(src_lens, tgt_lens, tc.max_tokens, shuffle=True, seed=tc.seed, epoch=epoch, count=tc.max_tokens_counts)


def follow_batch_plan(saved_train: dict[str, Any], tc: TrainConfig, state: TrainState, src_lens: np.ndarray, tgt_lens: np.ndarray) -> None:
    """When a plan key differs from the checkpoint's, go on at the same fraction of the interrupted epoch under the
    new plan (its batches are new ones: keeping the batch index would skip or repeat an arbitrary share of the epoch)."""
    defaults = TrainConfig()  # checkpoints older than a key hold its default
    old = replace(tc, **{k: saved_train.get(k, getattr(defaults, k)) for k in _PLAN_KEYS})
    changed = [f"train.{k} {getattr(old, k)!r} -> {getattr(tc, k)!r}" for k in _PLAN_KEYS if getattr(old, k) != getattr(tc, k)]
    if not changed:
        return
    if state.batch_in_epoch == 0:
        log.info("resume: %s since the checkpoint; the next epoch is planned with the new value(s)", ", ".join(changed))
        return
    n_old = len(epoch_batches(old, src_lens, tgt_lens, state.epoch))
    n_new = len(epoch_batches(tc, src_lens, tgt_lens, state.epoch))
    position = round(state.batch_in_epoch * n_new / n_old)  # at or past the end: the loop starts the next epoch
    log.warning(
        "resume: %s since the checkpoint, so epoch %d is cut into new batches; training goes on at the same fraction of "
        "it: batch %d of %d (the checkpoint was at %d of %d)",
        ", ".join(changed), state.epoch + 1, position, n_new, state.batch_in_epoch, n_old,
    )
    state.batch_in_epoch = position


def resume_state(
    run_dir: Path, cfg: Config, tokenizer: Tokenizer, model: Transformer, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, lengths: tuple[np.ndarray, np.ndarray], digests: tuple[str, str], rank: int = 0,
    world_size: int = 1,
) -> TrainState:
    """Restore everything from last.pt when the run directory has one; refuse a changed config (weight sections),
    follow a changed batch plan (`follow_batch_plan`) or changed data (`follow_data`)."""
    last = checkpoint_dir(run_dir) / "last.pt"
    if not last.is_file():
        return TrainState(train_data_digest=digests[0], valid_data_digest=digests[1])
    saved = load_checkpoint(last)
    if missing := [key for key in ("optimizer", "scaler", "train_state", "rng") if key not in saved]:
        raise CheckpointError(
            f"{last} holds weights without a training state ({', '.join(missing)} missing): an averaged or exported"
            f" checkpoint, not one of this run's saves. Point last.pt back at a save (`ln -f {last.parent}/step-N.pt {last}`),"
            f" or train on from these weights in a new train.run_dir with train.init_from={last}"
        )
    diffs = config_differences(saved["config"], cfg.to_dict())
    started_from = saved["config"].get("train", {}).get("init_from", "")
    if started_from and not cfg.train.init_from:  # the run's provenance stays in its config and later saves
        cfg.train.init_from = started_from
    if cfg.train.init_from and cfg.train.init_from != started_from:
        log.warning("train.init_from %r is not used: %s resumes from its own checkpoint (%s)", cfg.train.init_from, run_dir,
                    f"which started from {started_from!r}" if started_from else "which started from scratch")
    if diffs:
        raise CheckpointError(
            f"{run_dir} holds a run with a different config; refusing to resume. Differences:\n  " + "\n  ".join(diffs)
            + "\nUse a new train.run_dir, or restore these settings."
        )
    if tokenizer_from_state(saved).fingerprint != tokenizer.fingerprint:
        raise CheckpointError(f"{last}: its tokenizer differs from {run_dir / 'tokenizer'}; refusing to resume")
    check_model_matches(model, saved["model"], str(last))
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if changed := apply_optimizer_settings(optimizer, cfg):  # its param groups came back with the checkpoint's settings
        log.warning("resume: %s since the checkpoint; AdamW goes on with the config's values (its moments are kept)", "; ".join(changed))
    if saved["scaler"]:  # empty from a run without the fp16 grad scaler: one that now has it starts it afresh
        scaler.load_state_dict(saved["scaler"])
    # each rank its own random states where the save has them for this many ranks; else rank 0's (another number of
    # processes, or a save from before they were kept)
    by_rank = saved.get("rng_by_rank")
    restore_rng_states(by_rank[rank] if isinstance(by_rank, list) and len(by_rank) == world_size else saved["rng"])
    known = {f.name for f in fields(TrainState)}
    if unknown := sorted(set(saved["train_state"]) - known):  # written by a newer nmtkit
        log.warning("resume: %s records %s, which this version of nmtkit does not know; left out", last, ", ".join(unknown))
    state = TrainState(**{k: v for k, v in saved["train_state"].items() if k in known})
    if "best_scheduled_loss" not in saved["train_state"]:  # a checkpoint from before the field
        state.best_scheduled_loss = state.best_valid_loss
    if not follow_data(cfg, state, len(lengths[0]), digests[0]):
        follow_batch_plan(saved["config"].get("train", {}), cfg.train, state, *lengths)
    old_valid = saved["config"].get("data", {}).get("valid", cfg.data.valid)
    if not same_path(old_valid, cfg.data.valid):  # losses of two splits do not compare
        log.warning("resume: data.valid %r -> %r since the checkpoint; the best valid loss so far (%.4f, on the old split)"
                    " is forgotten, and the next evaluation makes best.pt", old_valid, cfg.data.valid, state.best_valid_loss)
        state.best_valid_loss, state.best_scheduled_loss, state.evals_without_improvement = math.inf, math.inf, 0
    elif state.valid_data_digest not in ("", digests[1]):
        log.warning("resume: the validation pairs of data.valid (%s) differ from the checkpoint's (the file changed, or"
                    " model.max_positions, or the checkpoint is from an nmtkit that validated on the pairs its training filters"
                    " kept); the best valid loss so far (%.4f, on the old pairs) is forgotten, and the next evaluation makes"
                    " best.pt", cfg.data.valid, state.best_valid_loss)
        state.best_valid_loss, state.best_scheduled_loss, state.evals_without_improvement = math.inf, math.inf, 0
    state.train_data_digest, state.valid_data_digest = digests
    log.info("resumed from %s at step %d (epoch %d, batch %d)", last, state.step, state.epoch + 1, state.batch_in_epoch)  # 1-based, as the log's
    return state


def follow_data(cfg: Config, state: TrainState, n_pairs: int, digest: str) -> bool:
    """When the training pairs changed since the checkpoint (a file edited, appended to or replaced at the same path),
    end the interrupted epoch: its batch plan was made for the old pairs, and its position means nothing in a plan of
    the new ones. True when they changed."""
    if state.train_data_digest in ("", digest):  # unchanged, or a checkpoint that did not record them
        return False
    ends = f"epoch {state.epoch + 1} ends here and training goes on with epoch {state.epoch + 2}" if state.batch_in_epoch else "the next epoch is planned over them"
    log.warning("resume: the training pairs of data.train (%s; %s after filtering) changed since the checkpoint; %s",
                cfg.data.train, f"{n_pairs:,}", ends)
    if state.batch_in_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return True
