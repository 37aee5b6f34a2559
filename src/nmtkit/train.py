"""Training: setup, then one loop that reads top to bottom, then cleanup.

One optimizer step consumes `accum_steps` batches; the loss is summed over their target tokens and
divided by the step's total token count, so accumulation trains like one larger batch. Batches
come from `make_batches(seed, epoch)`, which is deterministic, so resuming is "skip the first k
batches of this epoch" plus restoring the RNG states.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .allocator import allocator_in_use
from .batching import make_batches, padding_fraction, read_batch
from .checkpoint import CheckpointError, checkpoint_dir, config_differences, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, TrainConfig
from .data import DataError, load_split
from .device import Runtime, choose_runtime, free_memory
from .distributed import Dist, describe, init_distributed, shutdown_distributed
from .encoded import content_digest, encode_split, length_arrays
from .evaluate import teacher_forced_metrics
from .init_from import init_checkpoint
from .loss import TrainingObjective
from .metrics import MetricsLog
from .model import Transformer
from .rng import restore_rng_states, rng_states, seed_everything
from .run_lock import RunLock, RunLockedError
from .run_tokenizer import prepare_tokenizer
from .runinfo import write_run_info
from .schedule import lr_at
from .step import SkippedSteps, make_optimizer, train_step
from .stop_signal import StopSignal
from .tokenizer import Tokenizer
from .translator import build_model, check_model_matches, tokenizer_from_state

log = logging.getLogger(__name__)



@dataclass
class TrainState:
    """Where training is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    tokens_seen: int = 0  # non-pad target tokens trained on
    best_valid_loss: float = math.inf
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0  # training wall time over all sessions
    skipped_steps: int = 0  # steps skipped for a non-finite gradient, in total
    oom_skipped: int = 0  # batches skipped because they ran out of memory
    bad_steps_in_a_row: int = 0
    # what the run trains and validates on, to notice files changed at the same path on resume (empty: not recorded)
    train_data_digest: str = ""  # the training pairs' lengths, in order: what the batch plan is made of (their ids
    # would tell more, but reading a 10M-pair table's ids brings ~1 GB of its pages into memory)
    valid_data_digest: str = ""  # the validation pairs' piece ids


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    stop_reason: str
    valid_loss: float


# Train keys that decide the batch plan (`make_batches`). They may change on resume (a smaller max_tokens after
# running out of memory, say), but then the interrupted epoch's plan changes too, and its position must follow.
_PLAN_KEYS = ("max_tokens", "max_tokens_counts", "seed")


def epoch_batches(tc: TrainConfig, src_lens: np.ndarray, tgt_lens: np.ndarray, epoch: int) -> list[np.ndarray]:
    """The training batches of `epoch` under the plan keys of `tc` (the training loop's, the benchmark's, a resume's)."""
    return make_batches(src_lens, tgt_lens, tc.max_tokens, shuffle=True, seed=tc.seed, epoch=epoch, count=tc.max_tokens_counts)


def _follow_batch_plan(saved_train: dict[str, Any], tc: TrainConfig, state: TrainState, src_lens: np.ndarray, tgt_lens: np.ndarray) -> None:
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


def _resume(
    run_dir: Path, cfg: Config, tokenizer: Tokenizer, model: Transformer, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, lengths: tuple[np.ndarray, np.ndarray], digests: tuple[str, str],
) -> TrainState:
    """Restore everything from last.pt when the run directory has one; refuse a changed config (weight sections),
    follow a changed batch plan (`_follow_batch_plan`) or changed data (`_follow_data`)."""
    last = checkpoint_dir(run_dir) / "last.pt"
    if not last.is_file():
        return TrainState(train_data_digest=digests[0], valid_data_digest=digests[1])
    saved = load_checkpoint(last)
    diffs = config_differences(saved["config"], cfg.to_dict())
    started_from = saved["config"].get("train", {}).get("init_from", "")
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
    scaler.load_state_dict(saved["scaler"])
    restore_rng_states(saved["rng"])
    known = {f.name for f in fields(TrainState)}
    if unknown := sorted(set(saved["train_state"]) - known):  # written by a newer nmtkit
        log.warning("resume: %s records %s, which this version of nmtkit does not know; left out", last, ", ".join(unknown))
    state = TrainState(**{k: v for k, v in saved["train_state"].items() if k in known})
    if not _follow_data(cfg, state, len(lengths[0]), digests[0]):
        _follow_batch_plan(saved["config"].get("train", {}), cfg.train, state, *lengths)
    old_valid = saved["config"].get("data", {}).get("valid", cfg.data.valid)
    if os.path.normpath(old_valid) != os.path.normpath(cfg.data.valid):  # losses of two splits do not compare
        log.warning("resume: data.valid %r -> %r since the checkpoint; the best valid loss so far (%.4f, on the old split)"
                    " is forgotten, and the next evaluation makes best.pt", old_valid, cfg.data.valid, state.best_valid_loss)
        state.best_valid_loss, state.evals_without_improvement = math.inf, 0
    elif state.valid_data_digest not in ("", digests[1]):
        log.warning("resume: the pairs of data.valid (%s) changed since the checkpoint; the best valid loss so far (%.4f, on"
                    " the old pairs) is forgotten, and the next evaluation makes best.pt", cfg.data.valid, state.best_valid_loss)
        state.best_valid_loss, state.evals_without_improvement = math.inf, 0
    state.train_data_digest, state.valid_data_digest = digests
    log.info("resumed from %s at step %d (epoch %d, batch %d)", last, state.step, state.epoch + 1, state.batch_in_epoch)  # 1-based, as the log's
    return state


def _follow_data(cfg: Config, state: TrainState, n_pairs: int, digest: str) -> bool:
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


def train(cfg: Config, argv: list[str] | None = None) -> TrainResult:
    """Train (or resume) the run in `cfg.train.run_dir` until a stop condition is met."""
    # checked here, not in every config: a trained model with such settings still loads for decoding
    if cfg.data.max_len + 1 > cfg.model.max_positions:  # a kept pair is max_len pieces plus EOS (source) or BOS (target)
        raise ConfigError([
            f"data.max_len: {cfg.data.max_len} pieces plus EOS/BOS need {cfg.data.max_len + 1} positions, more than"
            f" model.max_positions={cfg.model.max_positions}; lower data.max_len or raise model.max_positions"
        ])
    runtime = choose_runtime(cfg.train.device, cfg.train.precision)
    dist = init_distributed(runtime.device.type)
    if runtime.device.type == "cuda" and dist.is_distributed:
        runtime.device = torch.device("cuda", dist.local_rank)
    try:
        with _run_lock(cfg.train.run_dir, dist), StopSignal() as stop:
            return _train(cfg, argv, runtime, dist, stop)
    finally:
        shutdown_distributed()


@contextlib.contextmanager
def _run_lock(run_dir: str, dist: Dist) -> Iterator[None]:
    """Rank 0's lock of the run directory, and its outcome agreed by every rank: a refusal stops them all with the
    same error (alone, rank 0 would exit and leave the others to fail in their first collective)."""
    lock, failure = RunLock(run_dir) if dist.is_main else None, None
    try:
        if lock is not None:
            lock.__enter__()
    except Exception as e:  # whatever it is, the other ranks must hear of it before their first collective
        failure, lock = e, None
    try:
        try:
            refused = dist.any(failure is not None)
        except Exception:
            if failure is not None:
                raise failure from None  # rank 0's own error says more than a broken exchange
            raise
        if refused:
            raise failure or RunLockedError(f"rank 0 could not take the lock of {run_dir}; its message says why")
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _train(cfg: Config, argv: list[str] | None, runtime: Runtime, dist: Dist, stop: StopSignal) -> TrainResult:
    # ---------------------------------------------------------------- setup
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if not dist.is_main:
        logging.getLogger(__package__).setLevel(logging.ERROR)  # rank 0 alone logs (data, tokenizer, warnings and all)
    log.info("run %s: %s, %d CPU threads, %s", run_dir, runtime.reason, torch.get_num_threads(), allocator_in_use())
    if dist.is_distributed:  # logged after the lock: a refused rank 0 must not write into another run's train.log
        log.info("distributed: %s", describe(dist))
    seed_everything(tc.seed)
    # opened first, so that a missing tensorboard package stops the run before any work
    metrics = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if tc.tensorboard and dist.is_main else None)

    # Rank 0 trains the tokenizer and writes the Arrow caches; the other ranks wait, then read them.
    if not dist.is_main:
        dist.barrier()
    init = init_checkpoint(cfg, run_dir)  # fine-tuning: another run's weights and tokenizer start this one (checked first)
    cache_dir = Path(cfg.data.cache_dir or run_dir / "cache")
    train_raw = load_split(cfg.data, "train", cache_dir)
    valid_raw = load_split(cfg.data, "valid", cache_dir)
    tokenizer = prepare_tokenizer(cfg, run_dir, train_raw, tokenizer_from_state(init[1]) if init else None)
    train_ds, report = encode_split(train_raw, tokenizer, cfg.data, "train", apply_filters=True)
    log.info("data: %s", report.summary())
    valid_ds, vreport = encode_split(valid_raw, tokenizer, cfg.data, "valid", apply_filters=True)
    log.info("data: %s", vreport.summary())
    # Training reads the encoded tables only. The raw ones are memory-mapped, and the pages that loading and
    # encoding touched (all of them) would stay in the process's resident memory: 1.2 GB for 10M pairs.
    del train_raw, valid_raw
    if dist.is_main:
        dist.barrier()
    for key, ds, rep in (("train", train_ds, report), ("valid", valid_ds, vreport)):
        if len(ds) == 0:  # an empty validation split would score 0.0 and keep the first best.pt for good
            raise DataError(f"data.{key} ({getattr(cfg.data, key)}): no pairs left after filtering ({rep.summary()}); check data.max_len and data.max_len_ratio")
    src_lens, tgt_lens = length_arrays(train_ds)

    model = build_model(cfg, tokenizer, cfg.train.attention_kernel).to(runtime.device)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log.info("model: %.2fM parameters, vocab %d/%d, %s-norm", n_params / 1e6, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, cfg.model.norm)
    if init is not None:
        check_model_matches(model, init[1]["model"], str(init[0]))
        model.load_state_dict(init[1]["model"])
        log.info("model: weights of %s (step %d) from train.init_from", init[0], init[1].get("step", 0))
        del init
    optimizer = make_optimizer(model, cfg, runtime)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_grad_scaler)
    digests = (content_digest(train_ds, ("src_len", "tgt_len")), content_digest(valid_ds, ("src_ids", "tgt_ids")))
    state = _resume(run_dir, cfg, tokenizer, model, optimizer, scaler, (src_lens, tgt_lens), digests)
    if dist.is_main:
        write_run_info(run_dir, cfg, argv, runtime.reason)  # after the resume checks: a refused resume changes nothing
    # The training computation (model + fused loss) is one module, which DDP wraps when
    # distributed; evaluation and checkpoints use the plain model.
    objective: nn.Module = TrainingObjective(model, tc.label_smoothing, runtime.dtype, compile=tc.compile)
    if dist.is_distributed:
        objective = nn.parallel.DistributedDataParallel(objective)

    def checkpoint_state() -> dict[str, Any]:
        return {
            "config": cfg.to_dict(),
            "tokenizer": {"src": tokenizer.src_proto, "tgt": tokenizer.tgt_proto},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "train_state": asdict(state),
            "rng": rng_states(),
            "step": state.step,
        }

    valid_loss = state.best_valid_loss
    t_start = time.time() - state.elapsed_s
    window_loss = torch.zeros((), device=runtime.device)  # summed on the device; read once per log line
    window_tokens, window_t0 = 0, time.time()
    bar = tqdm(total=tc.max_steps or None, initial=state.step, disable=not (tc.progress_bar and dist.is_main), unit="step", dynamic_ncols=True)

    def should_stop() -> str:
        if stop.requested:
            return f"interrupted by {stop.requested}; run the same command to resume"
        if tc.max_steps and state.step >= tc.max_steps:
            return f"reached train.max_steps={tc.max_steps}"
        if tc.max_epochs and state.epoch >= tc.max_epochs:
            return f"reached train.max_epochs={tc.max_epochs}"
        if tc.max_minutes and (time.time() - t_start) >= tc.max_minutes * 60:
            return f"reached train.max_minutes={tc.max_minutes}"
        if tc.patience and state.evals_without_improvement >= tc.patience:
            return f"no validation improvement in {tc.patience} evaluations (train.patience)"
        return ""

    def agreed(reason: str) -> str:
        """The stop every rank acts on: a stop on one rank (a signal, its clock, rank 0's patience) stops all."""
        anyone = dist.any(bool(reason))  # every rank takes part, with a reason or without
        return reason or ("stopped by another rank" if anyone else "")

    nonfinite = SkippedSteps(state, tc.max_bad_steps, checkpoint_dir(run_dir) / "last.pt")

    def validate() -> bool:
        """Validation loss (rank 0); returns True when it is the best so far."""
        nonlocal valid_loss
        m = teacher_forced_metrics(model, valid_ds, tc.max_tokens, runtime)
        valid_loss = m.loss
        is_best = m.loss < state.best_valid_loss
        if is_best:
            state.best_valid_loss, state.evals_without_improvement = m.loss, 0
        else:
            state.evals_without_improvement += 1
        log.info("step %d | valid loss %.4f | ppl %.2f | acc %.3f%s", state.step, m.loss, m.perplexity, m.token_accuracy, " | best" if is_best else "")
        metrics.write(step=state.step, epoch=state.epoch + 1, valid_loss=m.loss, valid_ppl=m.perplexity, valid_acc=m.token_accuracy, tokens_seen=state.tokens_seen, elapsed_s=round(time.time() - t_start, 2))
        return is_best

    # ---------------------------------------------------------------- the loop
    # Every rank builds the same batch list; a step takes accum_steps * world_size consecutive
    # batches and rank r trains on its own accum_steps of them.
    per_step = tc.accum_steps * dist.world_size
    model.train()
    stop_reason = agreed(should_stop())  # e.g. a signal that reached one rank during the setup
    earlier_records = metrics.path.is_file() and metrics.path.stat().st_size > 0
    if not state.step and earlier_records:
        log.warning("%s holds the records of an earlier run but no last.pt: this run starts afresh, its metrics follow a"
                    " mark in metrics.jsonl, and its saves replace the earlier ones of the same steps", run_dir)
    if (state.step or earlier_records) and dist.is_main:  # resumed (or restarted): what was logged after this step is
        metrics.write(step=state.step, resumed=True)  # redone, and `nmtkit plot` drops it
    if stop_reason:
        limit = stop_reason.startswith("reached train.")  # max_steps, max_epochs or max_minutes
        log.info("no step to train: %s%s", stop_reason, " (raise it with --set to continue)" if limit else "")
    while not stop_reason:
        batches = epoch_batches(tc, src_lens, tgt_lens, state.epoch)
        n_usable = len(batches) if not dist.is_distributed else len(batches) - len(batches) % per_step
        # A resume under another batch plan or number of processes can land between two steps (distributed ranks
        # then need whole steps, or one would get no batch) or past this epoch's last usable batch.
        if dist.is_distributed:
            state.batch_in_epoch -= state.batch_in_epoch % per_step
        if state.batch_in_epoch >= n_usable:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            stop_reason = agreed(should_stop())
            continue
        if state.batch_in_epoch == 0:
            src_pad, tgt_pad = padding_fraction(batches, src_lens, tgt_lens)
            log.info("epoch %d: %d batches, padding %.1f%% source / %.1f%% target", state.epoch + 1, len(batches), 100 * src_pad, 100 * tgt_pad)
        for start in range(state.batch_in_epoch, n_usable, per_step):
            step_batches = batches[start : start + per_step]
            mine = step_batches[dist.rank * tc.accum_steps : (dist.rank + 1) * tc.accum_steps]
            n_tokens = int(sum(tgt_lens[b].sum() + len(b) for b in step_batches))  # all ranks, EOS included
            group = [read_batch(train_ds, i).to(runtime.device, non_blocking=True) for i in mine]
            lr = lr_at(state.step + 1, tc)
            try:
                loss_sum, is_bad = train_step(
                    objective, optimizer, scaler, group, n_tokens, runtime, lr, tc.clip_norm,
                    world_size=dist.world_size, check_finite=tc.skip_nonfinite,
                )
            except torch.OutOfMemoryError:
                # One rank skipping alone would hang the others in the next all-reduce, so
                # distributed runs stop instead (the last checkpoint is intact).
                if not tc.skip_oom_batches or dist.is_distributed:
                    raise
                optimizer.zero_grad(set_to_none=True)
                state.oom_skipped += 1
                shapes = ", ".join(f"{tuple(b.src.shape)}->{tuple(b.tgt_in.shape)}" for b in group)
                log.warning("out of memory on batch %s (%s); skipped (%d so far). Lower train.max_tokens (now %d) if this repeats",
                            shapes, free_memory(runtime), state.oom_skipped, tc.max_tokens)
                del group
                state.batch_in_epoch = start + len(step_batches)
                if state.batch_in_epoch >= n_usable:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                continue
            state.step += 1
            state.batch_in_epoch = start + len(step_batches)
            if state.batch_in_epoch >= n_usable:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            state.tokens_seen += n_tokens
            window_tokens += n_tokens
            if is_bad is None:
                window_loss += loss_sum
            else:  # the step's bookkeeping waits for its flag: read after the next step is queued
                window_loss += loss_sum.masked_fill(is_bad, 0.0)
                nonfinite.add(state.step, is_bad, n_tokens)
                window_tokens -= nonfinite.settle(keep_newest=True)
            state.elapsed_s = time.time() - t_start
            bar.update(1)

            stop_reason = should_stop()
            # one host-side exchange per step (distributed): a stop on any rank makes the step due everywhere
            is_due = state.step % tc.eval_every == 0 or dist.any(bool(stop_reason))
            if is_due or state.step % tc.log_every == 0 or state.step % tc.save_every == 0 or state.batch_in_epoch == 0:
                window_tokens -= nonfinite.settle()  # everything logged, evaluated or saved (a stop saves) counts every step

            if state.step % tc.log_every == 0:
                now = time.time()
                train_loss = dist.sum(window_loss).item() / max(1, window_tokens)
                tok_s = window_tokens / max(1e-9, now - window_t0)
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s / 1e3:.1f}k")
                skipped = f" | skipped {state.skipped_steps}" if state.skipped_steps else ""
                log.info("step %d | loss %.3f | lr %.1e | tok/s %.1fk | epoch %d | %.0fs%s", state.step, train_loss, lr, tok_s / 1e3, state.epoch + 1, state.elapsed_s, skipped)
                if dist.is_main:
                    metrics.write(
                        step=state.step, epoch=state.epoch + 1, train_loss=train_loss, lr=lr, tgt_tokens_per_s=tok_s, tokens_seen=state.tokens_seen,
                        elapsed_s=round(state.elapsed_s, 2), skipped_steps=state.skipped_steps, oom_skipped=state.oom_skipped,
                    )
                window_loss.zero_()
                window_tokens, window_t0 = 0, now

            is_best = False
            if is_due:  # ranks agree on due steps, so they all take this exchange
                is_best = validate() if dist.is_main else False
                stop_reason = agreed(stop_reason or should_stop())  # rank 0's evaluation decides patience
            if dist.is_main and (state.step % tc.save_every == 0 or is_best or stop_reason):
                save_checkpoint(run_dir, checkpoint_state(), state.step, is_best=is_best, keep=tc.keep_checkpoints)
            if stop_reason or state.batch_in_epoch == 0:
                break

    # ---------------------------------------------------------------- cleanup
    nonfinite.settle()
    bar.close()
    metrics.close()
    dist.barrier()
    log.info("stopped: %s; step %d, best valid loss %.4f, %.0fs", stop_reason, state.step, state.best_valid_loss, state.elapsed_s)
    return TrainResult(run_dir, state, stop_reason, valid_loss)
