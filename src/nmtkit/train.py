"""Training: setup, then one loop that reads top to bottom, then cleanup.

One optimizer step consumes `accum_steps` batches; the loss is summed over their target tokens and
divided by the step's total token count, so accumulation trains like one larger batch. Batches
come from `make_batches(seed, epoch)`, which is deterministic, so resuming is "skip the first k
batches of this epoch" plus restoring the RNG states (resume.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .allocator import allocator_in_use
from .batching import padding_fraction, read_batch
from .checkpoint import checkpoint_dir, save_checkpoint, set_aside_later_saves
from .config import Config, ConfigError
from .data import DataError, load_split
from .device import Runtime, choose_runtime, free_memory
from .distributed import Dist, describe, init_distributed, shutdown_distributed
from .encoded import content_digest, encode_split, length_arrays, readable_pairs
from .evaluate import teacher_forced_metrics
from .init_from import init_checkpoint
from .loss import TrainingObjective
from .metrics import MetricsLog
from .resume import TrainState, epoch_batches, resume_state
from .rng import rng_states, seed_everything
from .run_lock import RunLock, RunLockedError
from .run_tokenizer import prepare_tokenizer
from .runinfo import write_run_info
from .schedule import lr_at
from .step import SkippedSteps, make_optimizer, train_step
from .stop_signal import StopSignal
from .translator import build_model, check_model_matches, tokenizer_from_state

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    stop_reason: str
    valid_loss: float


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
    # Nothing to save yet: a signal stops the setup where it is. Not under torchrun, where the ranks must agree on a
    # stop (rank 1 waits in a barrier while rank 0 prepares the data): there the loop's first check stops them all.
    stop.at_once = not dist.is_distributed
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
    # Validation scores the split as `nmtkit evaluate` does: the training filters (data.max_len, max_len_ratio) would
    # choose best.pt on a tokenizer-dependent subset; only pairs longer than the model's positions are left out.
    valid_all, _ = encode_split(valid_raw, tokenizer, cfg.data, "valid", apply_filters=False)
    valid_ds, n_long = readable_pairs(valid_all.select_columns(["src_ids", "tgt_ids", "src_len", "tgt_len"]), cfg.model.max_positions)
    vsummary = f"valid: {len(valid_ds):,} of {len(valid_all):,} pairs ({n_long:,} longer than model.max_positions={cfg.model.max_positions})"
    log.info("data: %s", vsummary)
    # Training reads the encoded tables only. The raw ones are memory-mapped, and the pages that loading and
    # encoding touched (all of them) would stay in the process's resident memory: 1.2 GB for 10M pairs.
    del train_raw, valid_raw, valid_all
    if dist.is_main:
        dist.barrier()
    if len(train_ds) == 0:
        raise DataError(f"data.train ({cfg.data.train}): no pairs left after filtering ({report.summary()}); check data.max_len and data.max_len_ratio")
    if len(valid_ds) == 0:  # an empty validation split would score 0.0 and keep the first best.pt for good
        raise DataError(f"data.valid ({cfg.data.valid}): no pairs to validate on ({vsummary}); check the file and model.max_positions")
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
    state = resume_state(run_dir, cfg, tokenizer, model, optimizer, scaler, (src_lens, tgt_lens), digests, dist.rank, dist.world_size)
    if dist.is_main:
        write_run_info(run_dir, cfg, argv, runtime.reason)  # after the resume checks: a refused resume changes nothing
        if (aside := set_aside_later_saves(run_dir, state.step)) is not None:
            names = ", ".join(p.name for p in sorted(aside.iterdir()))
            where = f"last.pt is step {state.step}, and the saves after it" if state.step else "no last.pt, and the step files"
            log.warning("%s (%s) are from training this run does not go on from; moved to %s, out of keep-N rotation"
                        " and `nmtkit average`", where, names, aside)
    # The training computation (model + fused loss) is one module, which DDP wraps when
    # distributed; evaluation and checkpoints use the plain model.
    objective: nn.Module = TrainingObjective(model, tc.label_smoothing, runtime.dtype, compile=tc.compile)
    if dist.is_distributed:
        objective = nn.parallel.DistributedDataParallel(objective)

    def checkpoint_state(rank_rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """What a save holds; `rank_rngs`: every rank's random states, so that each rank of a resumed distributed run
        goes on with its own dropout stream (rank 0's alone gave every rank the same masks after a resume)."""
        return {
            "config": cfg.to_dict(),
            "tokenizer": {"src": tokenizer.src_proto, "tgt": tokenizer.tgt_proto},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "train_state": asdict(state),
            "rng": rank_rngs[0],
            "rng_by_rank": rank_rngs,
            "step": state.step,
        }

    valid_loss = state.best_valid_loss
    t_start = time.time() - state.elapsed_s
    # The log window: its loss summed on the device (read once per log line) and its target tokens. A checkpoint keeps
    # both (`TrainState.window_*`, rank 0's the sum over ranks), so that the first log line after a resume covers
    # the steps before the stop too, as an uninterrupted run's does. tok/s counts this session's steps only.
    window_loss = torch.full((), state.window_loss if dist.is_main else 0.0, device=runtime.device)
    window_tokens, window_t0, tokens_before_t0 = state.window_tokens, time.time(), state.window_tokens
    # disable=None: a bar on a terminal only, not a log file's worth of carriage returns when stderr is redirected
    bar = tqdm(total=tc.max_steps or None, initial=state.step, disable=None if tc.progress_bar and dist.is_main else True, unit="step", dynamic_ncols=True)

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

    def validate(epoch: int) -> bool:
        """Validation loss (rank 0); returns True when it is the best so far. Only the evaluations of the schedule
        (every train.eval_every steps) count for train.patience: the one at a stop (Ctrl-C, a time or step limit)
        would otherwise use up a unit of patience at every preemption of a resumed job."""
        nonlocal valid_loss
        m = teacher_forced_metrics(model, valid_ds, max(tc.max_tokens, cfg.model.max_positions), runtime)  # as evaluate's
        valid_loss = m.loss
        is_best = m.loss < state.best_valid_loss
        if is_best:
            state.best_valid_loss = m.loss
        if state.step % tc.eval_every == 0:  # patience compares scheduled evaluations only, among themselves
            improved = m.loss < state.best_scheduled_loss
            state.best_scheduled_loss = min(state.best_scheduled_loss, m.loss)
            state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
        log.info("step %d | valid loss %.4f | ppl %.2f | acc %.3f%s", state.step, m.loss, m.perplexity, m.token_accuracy, " | best" if is_best else "")
        metrics.write(step=state.step, epoch=epoch, valid_loss=m.loss, valid_ppl=m.perplexity, valid_acc=m.token_accuracy, tokens_seen=state.tokens_seen, elapsed_s=round(time.time() - t_start, 2))
        return is_best

    # ---------------------------------------------------------------- the loop
    # Every rank builds the same batch list; a step takes accum_steps * world_size consecutive
    # batches and rank r trains on its own accum_steps of them.
    per_step = tc.accum_steps * dist.world_size
    model.train()
    stop.at_once = False  # from here a signal finishes the step and saves
    stop_reason = agreed(should_stop())  # e.g. a signal that reached one rank during the setup
    earlier_records = metrics.path.is_file() and metrics.path.stat().st_size > 0
    if not state.step and earlier_records:
        log.warning("%s holds the records of an earlier run but no last.pt: this run starts afresh, its metrics follow a"
                    " mark in metrics.jsonl, and its saves replace the earlier ones of the same steps", run_dir)
    if (state.step or earlier_records) and dist.is_main:  # resumed (or restarted): what was logged after this step is
        metrics.resumed_at(state.step)  # redone, and `nmtkit plot` and TensorBoard drop it
    if stop_reason:
        limit = stop_reason.startswith("reached train.")  # max_steps, max_epochs or max_minutes
        log.info("no step to train: %s%s", stop_reason, " (raise it with --set to continue)" if limit else "")
    while not stop_reason:
        batches = epoch_batches(tc, src_lens, tgt_lens, state.epoch)
        n_usable = len(batches) if not dist.is_distributed else len(batches) - len(batches) % per_step
        if n_usable == 0:  # every rank alike: the loop would only count epochs, training nothing
            raise ConfigError([
                f"train: an epoch of data.train makes {len(batches)} batch(es), fewer than one step takes"
                f" (train.accum_steps={tc.accum_steps} on each of {dist.world_size} processes); lower train.accum_steps"
                " or train.max_tokens, or run fewer processes"
            ])
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
            epoch_of_step = state.epoch + 1  # 1-based, for the log: the step that ends an epoch belongs to it
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
                window_sum = dist.sum(window_loss).item()  # every rank takes part
                # a window whose every step was skipped trained on nothing: no loss to show (0.0 would look perfect)
                train_loss = window_sum / window_tokens if window_tokens else None
                shown = f"{train_loss:.3f}" if train_loss is not None else "n/a (every step skipped)"
                tok_s = (window_tokens - tokens_before_t0) / max(1e-9, now - window_t0)
                bar.set_postfix(loss=shown, lr=f"{lr:.1e}", tok_s=f"{tok_s / 1e3:.1f}k")
                skipped = f" | skipped {state.skipped_steps}" if state.skipped_steps else ""
                log.info("step %d | loss %s | lr %.1e | tok/s %.1fk | epoch %d | %.0fs%s", state.step, shown, lr, tok_s / 1e3, epoch_of_step, state.elapsed_s, skipped)
                if dist.is_main:
                    metrics.write(
                        step=state.step, epoch=epoch_of_step, **({"train_loss": train_loss} if train_loss is not None else {}), lr=lr,
                        tgt_tokens_per_s=tok_s, tokens_seen=state.tokens_seen, elapsed_s=round(state.elapsed_s, 2),
                        skipped_steps=state.skipped_steps, oom_skipped=state.oom_skipped,
                    )
                window_loss.zero_()
                window_tokens, window_t0, tokens_before_t0 = 0, now, 0

            is_best = False
            if is_due:  # ranks agree on due steps, so they all take this exchange
                is_best = validate(epoch_of_step) if dist.is_main else False
                stop_reason = agreed(stop_reason or should_stop())  # rank 0's evaluation decides patience
            if state.step % tc.save_every == 0 or is_due:  # every rank: the steps a save can follow (is_best and a
                # stop come with is_due), whose exchanges all ranks take part in
                state.window_loss, state.window_tokens = dist.sum(window_loss.clone()).item(), window_tokens  # not in place
                rank_rngs = dist.gather(rng_states())
                if dist.is_main and (state.step % tc.save_every == 0 or is_best or stop_reason):
                    save_checkpoint(run_dir, checkpoint_state(rank_rngs), state.step, is_best=is_best, keep=tc.keep_checkpoints)
            if stop_reason or state.batch_in_epoch == 0:
                break

    # ---------------------------------------------------------------- cleanup
    nonfinite.settle()
    bar.close()
    metrics.close()
    dist.barrier()
    log.info("stopped: %s; step %d, best valid loss %.4f, %.0fs", stop_reason, state.step, state.best_valid_loss, state.elapsed_s)
    return TrainResult(run_dir, state, stop_reason, valid_loss)
