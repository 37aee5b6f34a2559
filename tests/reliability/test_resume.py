"""Bit-exact resume on CPU in fp32: a run that stops (cleanly, or killed with SIGKILL) and is resumed ends
with exactly the weights of a run that never stopped.

Raising train.max_steps on a finished run (tests/test_cli.py::test_rerun_with_more_steps_continues_from_the_last_step)
and refusing a changed model config (tests/test_train.py::test_resume_with_a_different_model_config_is_refused_with_the_differences,
tests/test_cli.py::test_resume_with_a_changed_model_exits_2_naming_the_difference) are tested there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    last_pt_step,
    max_abs_difference,
    one_torch_thread,  # noqa: F401 (autouse: tiny models train on one thread)
    subprocess_env,
    train_command,
    wait_for,
    write_config,
)

from conftest import tiny_config
from nmtkit.checkpoint import load_checkpoint, step_files
from nmtkit.resume import TrainState
from nmtkit.train import train


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value of `key` in metrics.jsonl; a step logged twice (replayed after a kill) keeps its last value."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def optimizer_tensors(checkpoint: dict) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state (step, exp_avg, exp_avg_sq) flattened to name -> tensor."""
    return {f"{i}.{name}": t for i, s in checkpoint["optimizer"]["state"].items() for name, t in s.items()}


# 600 pairs in batches of <= 512 tokens make a 28-batch epoch: stopping at 22 is mid-epoch, and 36 steps
# cross into the second epoch. Logging every 3 steps: the stop at 22 cuts the window of steps 22-24, which the
# checkpoint carries, so the resumed run's line at step 24 covers step 22 too.
SCHEDULE = {"log_every": 3, "eval_every": 6, "save_every": 3}


def test_run_stopped_mid_epoch_and_resumed_matches_an_uninterrupted_run_bit_for_bit(corpus: dict, tmp_path: Path) -> None:
    """Same logged losses, weights and optimizer moments: dropout 0.1 makes the restored RNG states count."""
    model = {"dropout": 0.1}
    straight = train(tiny_config(corpus, tmp_path / "straight", model=model, train={**SCHEDULE, "max_steps": 36}))
    half = train(tiny_config(corpus, tmp_path / "resumed", model=model, train={**SCHEDULE, "max_steps": 22}))
    resumed = train(tiny_config(corpus, tmp_path / "resumed", model=model, train={**SCHEDULE, "max_steps": 36}))

    assert (half.state.epoch, half.state.batch_in_epoch) == (0, 22)  # stopped mid-epoch, and mid-window
    assert straight.state.epoch == resumed.state.epoch == 1  # and resumed across the epoch boundary
    assert logged(tmp_path / "resumed", "train_loss") == logged(tmp_path / "straight", "train_loss")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    weight_diff = max_abs_difference(a["model"], b["model"])
    moment_diff = max_abs_difference(optimizer_tensors(a), optimizer_tensors(b))
    print(f"in-process resume: max |weight difference| = {weight_diff}, max |AdamW state difference| = {moment_diff}")
    assert weight_diff == 0.0
    assert moment_diff == 0.0


# max_tokens 128 makes a 98-batch epoch, so a kill anywhere in these 90 steps is mid-epoch; a save
# every 2 steps gives the kill checkpoints to land between.
KILLABLE = {"max_tokens": 128, "max_steps": 90, "save_every": 2, "log_every": 2, "eval_every": 30}


def test_run_killed_with_sigkill_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(corpus: dict, tmp_path: Path) -> None:
    straight_config = write_config(tmp_path / "straight.yaml", corpus, tmp_path / "straight", train=KILLABLE)
    killed_config = write_config(tmp_path / "killed.yaml", corpus, tmp_path / "killed", train=KILLABLE)
    killed_dir = tmp_path / "killed"
    env = subprocess_env()
    # The uninterrupted run trains beside the one that is killed: one thread each.
    with open(tmp_path / "straight.log", "w") as straight_log, open(tmp_path / "killed.log", "w") as killed_log:
        straight = subprocess.Popen(train_command(straight_config), env=env, stdout=straight_log, stderr=subprocess.STDOUT)
        victim = subprocess.Popen(train_command(killed_config), env=env, stdout=killed_log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: last_pt_step(killed_dir) >= 6 or victim.poll() is not None, 120, "last.pt at a step >= 6")
            victim.send_signal(signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
            assert straight.wait(timeout=120) == 0, (tmp_path / "straight.log").read_text()
        finally:
            for proc in (straight, victim):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    at_kill = load_checkpoint(killed_dir / "checkpoints" / "last.pt")["train_state"]
    assert at_kill["epoch"] == 0 and 6 <= at_kill["batch_in_epoch"] < KILLABLE["max_steps"]
    assert (killed_dir / "train.lock").is_file()  # SIGKILL leaves the lock of a dead process behind

    rerun = subprocess.run(train_command(killed_config), env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {killed_dir / 'checkpoints' / 'last.pt'} at step {at_kill['step']}" in rerun.stderr
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(killed_dir / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == KILLABLE["max_steps"]
    weight_diff = max_abs_difference(a["model"], b["model"])
    print(f"SIGKILL at step {at_kill['step']} and resume: max |weight difference| = {weight_diff}")
    assert weight_diff == 0.0
    assert logged(killed_dir, "train_loss") == logged(tmp_path / "straight", "train_loss")


def stop_then_resume_with(corpus: dict, run: Path, caplog, stop_at: int, **changes: object) -> tuple[TrainState, str]:
    """Train to step `stop_at` (mid-epoch), resume one step further with `changes` to the train section; return the
    resumed state and the warning about the new batch plan ("" when there was none)."""
    half = train(tiny_config(corpus, run, train={**SCHEDULE, "max_steps": stop_at}))
    assert (half.state.epoch, half.state.batch_in_epoch) == (0, stop_at)
    with caplog.at_level("WARNING", logger="nmtkit"):
        resumed = train(tiny_config(corpus, run, train={**SCHEDULE, "max_steps": stop_at + 1, **changes}))
    assert resumed.state.step == stop_at + 1
    return resumed.state, next((r.getMessage() for r in caplog.records if "cut into new batches" in r.getMessage()), "")


def test_resume_with_a_new_max_tokens_goes_on_at_the_same_fraction_of_the_epoch(corpus: dict, tmp_path: Path, caplog) -> None:
    """A changed batch plan (here max_tokens 512 -> 1024 after batch 21 of 28) cannot keep the batch index, which would
    point into different batches: the run goes on at 21/28 of the epoch's new plan, and says so."""
    state, warning = stop_then_resume_with(corpus, tmp_path / "run", caplog, 21, max_tokens=1024)
    assert "train.max_tokens 512 -> 1024" in warning
    position, n_new = map(int, re.search(r"batch (\d+) of (\d+) \(the checkpoint was at 21 of 28\)$", warning).groups())
    assert 10 < n_new < 20  # twice the tokens per batch: about half as many batches
    assert position == round(21 * n_new / 28)
    assert (state.epoch, state.batch_in_epoch) == (0, position + 1)


def test_resume_with_a_new_plan_that_lands_past_the_epochs_end_starts_the_next_epoch(corpus: dict, tmp_path: Path, caplog) -> None:
    """Batch 27 of 28 at 512 tokens is 27/28 of the epoch: under a 4,096-token plan of a few batches that rounds to
    its end. The run goes on with the next epoch instead of looping on an epoch with nothing left."""
    state, warning = stop_then_resume_with(corpus, tmp_path / "run", caplog, 27, max_tokens=4096)
    position, n_new = map(int, re.search(r"batch (\d+) of (\d+) \(", warning).groups())
    assert position == n_new  # the rescaled position is the end of the new plan
    assert (state.epoch, state.batch_in_epoch) == (1, 1)  # the one step came from the second epoch


def test_resume_with_a_new_seed_at_an_epoch_boundary_keeps_the_position(corpus: dict, tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    first = train(tiny_config(corpus, run, train={**SCHEDULE, "max_steps": 28}))
    assert (first.state.epoch, first.state.batch_in_epoch) == (1, 0)  # the 28-batch epoch is complete
    with caplog.at_level("INFO", logger="nmtkit"):
        resumed = train(tiny_config(corpus, run, train={**SCHEDULE, "max_steps": 30, "seed": 7}))
    assert any("train.seed 1 -> 7" in r.getMessage() and "next epoch" in r.getMessage() for r in caplog.records)
    assert not any("cut into new batches" in r.getMessage() for r in caplog.records)
    assert (resumed.state.epoch, resumed.state.batch_in_epoch) == (1, 2)


def own_copy(corpus: dict, folder: Path) -> dict[str, Path]:
    folder.mkdir()
    return {split: Path(shutil.copy(path, folder / path.name)) for split, path in corpus.items()}


def test_resume_after_the_training_file_changed_at_its_path_ends_the_interrupted_epoch(corpus: dict, tmp_path: Path, caplog) -> None:
    """Pairs appended to data.train make a new batch plan: batch 6 of the old plan means nothing in it, so the
    interrupted epoch ends (with a warning) rather than skipping or repeating an arbitrary share of the new pairs."""
    data, run = own_copy(corpus, tmp_path / "data"), tmp_path / "run"
    assert train(tiny_config(data, run, train={**SCHEDULE, "max_steps": 6})).state.batch_in_epoch == 6
    lines = data["train"].read_text(encoding="utf-8").splitlines(keepends=True)
    with open(data["train"], "a", encoding="utf-8") as f:
        f.writelines(lines[:100])
    with caplog.at_level("INFO", logger="nmtkit"):
        resumed = train(tiny_config(data, run, train={**SCHEDULE, "max_steps": 8}))
    warning = next(r.getMessage() for r in caplog.records if "training pairs of data.train" in r.getMessage())
    assert "changed since the checkpoint; epoch 1 ends here and training goes on with epoch 2" in warning
    assert (resumed.state.epoch, resumed.state.batch_in_epoch) == (1, 2)


def test_resume_after_the_validation_file_changed_at_its_path_forgets_the_best_loss(corpus: dict, tmp_path: Path, caplog) -> None:
    """Other pairs in data.valid, even with the old file's modification time (as `cp -p` or `rsync -a` leave it), are
    another split: the best loss measured on the old pairs no longer decides best.pt."""
    data, run = own_copy(corpus, tmp_path / "data"), tmp_path / "run"
    first = train(tiny_config(data, run, train={**SCHEDULE, "max_steps": 6}))
    old_times = data["valid"].stat()
    data["valid"].write_text(data["test"].read_text(encoding="utf-8"), encoding="utf-8")  # 40 other pairs
    os.utime(data["valid"], ns=(old_times.st_atime_ns, old_times.st_mtime_ns))
    with caplog.at_level("INFO", logger="nmtkit"):
        resumed = train(tiny_config(data, run, train={**SCHEDULE, "max_steps": 12}))
    assert any("the validation pairs of data.valid" in r.getMessage() and "is forgotten" in r.getMessage() for r in caplog.records)
    valid_at_12 = logged(run, "valid_loss")[12]
    assert resumed.state.best_valid_loss == valid_at_12 != first.state.best_valid_loss  # step 12 made best.pt on the new pairs
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == 12


def test_a_checkpoint_from_a_newer_nmtkit_resumes_leaving_out_what_it_does_not_know(corpus: dict, tmp_path: Path, caplog) -> None:
    from nmtkit.checkpoint import write_atomic

    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={**SCHEDULE, "max_steps": 3}))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state["train_state"]["a_later_field"] = 7
    write_atomic(state, run / "checkpoints" / "last.pt")
    with caplog.at_level("INFO", logger="nmtkit"):
        assert train(tiny_config(corpus, run, train={**SCHEDULE, "max_steps": 4})).state.step == 4
    assert any("a_later_field" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)


def test_a_run_saved_without_the_fp16_grad_scaler_resumes_with_it(corpus: dict, tmp_path: Path, monkeypatch) -> None:
    """The train section may change on resume, precision included: a bf16 or fp32 checkpoint holds the disabled grad
    scaler's empty state, which an enabled one (fp16) refuses to load. The scaler starts afresh instead."""
    from nmtkit.device import Runtime

    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"max_steps": 2}))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["scaler"] == {}
    monkeypatch.setattr(Runtime, "use_grad_scaler", property(lambda self: True))  # fp16's, which is for CUDA
    assert train(tiny_config(corpus, run, train={"max_steps": 3})).state.step == 3
    assert load_checkpoint(run / "checkpoints" / "last.pt")["scaler"]["scale"] == 2.0**16  # a fresh scaler's


def test_cuda_random_states_of_more_gpus_than_the_machine_has_restore_the_first_ones(monkeypatch) -> None:
    """A checkpoint holds one CUDA generator state per GPU its process saw; resumed where fewer are visible, setting
    the others would raise an IndexError."""
    from nmtkit import rng

    states, given = rng.rng_states(), []
    states["cuda"] = [torch.zeros(16, dtype=torch.uint8) + i for i in range(8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", given.append)
    rng.restore_rng_states(states)
    assert len(given) == 1 and [int(s[0]) for s in given[0]] == [0]


def test_relinking_last_pt_to_an_earlier_save_resumes_from_that_save(corpus: dict, tmp_path: Path, caplog) -> None:
    """The README's way back to an earlier save: `ln -f checkpoints/step-N.pt checkpoints/last.pt`."""
    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"max_steps": 4, "save_every": 2, "eval_every": 2}))
    directory = run / "checkpoints"
    (directory / "last.pt").unlink()
    os.link(directory / "step-000002.pt", directory / "last.pt")
    with caplog.at_level("INFO", logger="nmtkit"):
        assert train(tiny_config(corpus, run, train={"max_steps": 3, "save_every": 2, "eval_every": 2})).state.step == 3
    assert f"resumed from {directory / 'last.pt'} at step 2" in caplog.text
    assert load_checkpoint(directory / "last.pt")["step"] == 3
    # the abandoned save is kept, out of the way of rotation and `nmtkit average`
    assert [p.name for _, p in step_files(directory)] == ["step-000002.pt", "step-000003.pt"]
    assert (directory / "after-step-000002" / "step-000004.pt").is_file()
    assert "the saves after it (step-000004.pt)" in caplog.text


def test_a_rollback_keeps_the_new_saves_in_rotation_and_sets_the_abandoned_ones_aside(corpus: dict, tmp_path: Path) -> None:
    """keep_checkpoints 2: left in place, the abandoned step-8 stayed the newest by number, so rotation deleted step 6
    and `nmtkit average` would have mixed the new step 7 with step 8 of the abandoned stretch."""
    run = tmp_path / "run"
    schedule = {"save_every": 2, "eval_every": 2, "keep_checkpoints": 2}
    train(tiny_config(corpus, run, train={**schedule, "max_steps": 8}))
    directory = run / "checkpoints"

    def back_to_step_6() -> None:
        (directory / "last.pt").unlink()
        os.link(directory / "step-000006.pt", directory / "last.pt")

    back_to_step_6()
    train(tiny_config(corpus, run, train={**schedule, "max_steps": 7}))
    assert [n for n, _ in step_files(directory)] == [6, 7]
    assert (directory / "after-step-000006" / "step-000008.pt").is_file()
    back_to_step_6()  # again: the second abandoned stretch goes beside the first, never over it
    train(tiny_config(corpus, run, train={**schedule, "max_steps": 7}))
    assert (directory / "after-step-000006" / "step-000008.pt").is_file()
    assert (directory / "after-step-000006-2" / "step-000007.pt").is_file()


def test_adamw_settings_changed_on_resume_are_used_and_named(corpus: dict, tmp_path: Path, caplog) -> None:
    """The checkpoint's optimizer state carries the settings of the run that saved it; the config's win."""
    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"max_steps": 3}))
    changed = {"betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.05}
    with caplog.at_level("WARNING", logger="nmtkit"):
        train(tiny_config(corpus, run, train={"max_steps": 4, **changed}))
    decay, rest = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert (tuple(decay["betas"]), decay["eps"], decay["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)
    assert (tuple(rest["betas"]), rest["eps"], rest["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.0)
    assert "train.weight_decay: 0.0 -> 0.05" in caplog.text and "train.betas: (0.9, 0.98) -> (0.8, 0.95)" in caplog.text


def test_a_stop_and_resume_use_up_no_patience(corpus: dict, tmp_path: Path) -> None:
    """The evaluation at a stop (step 4, off the every-3 schedule) does not count for train.patience: an interrupted
    run stops where an uninterrupted one does. lr 1e-12 leaves the validation loss where the first evaluation put it."""
    schedule = {"lr": 1e-12, "eval_every": 3, "patience": 3, "max_steps": 60, "save_every": 60}
    straight = train(tiny_config(corpus, tmp_path / "straight", train=schedule))
    train(tiny_config(corpus, tmp_path / "resumed", train={**schedule, "max_steps": 4}))
    resumed = train(tiny_config(corpus, tmp_path / "resumed", train=schedule))
    assert "train.patience" in straight.stop_reason and "train.patience" in resumed.stop_reason
    assert resumed.state.step == straight.state.step == 12


def test_patience_compares_scheduled_evaluations_only_so_a_stops_better_loss_changes_nothing(corpus: dict, tmp_path: Path, monkeypatch) -> None:
    """Validation losses scripted per evaluation, eval_every 3, patience 1. Straight: 5.0 (step 3), 4.9 (6: better),
    4.95 (9: stop). Interrupted at 4, whose evaluation gives 4.8: that makes best.pt, but step 6's 4.9 must still
    count as better than step 3's 5.0, or the resumed run would stop at 6."""
    from types import SimpleNamespace

    import nmtkit.train as train_module

    def scripted(losses: list[float]):
        it = iter(losses)
        return lambda *args, **kwargs: SimpleNamespace(loss=(x := next(it)), perplexity=2.0 ** x, token_accuracy=0.5)

    schedule = {"eval_every": 3, "patience": 1, "max_steps": 12, "save_every": 12}
    monkeypatch.setattr(train_module, "teacher_forced_metrics", scripted([5.0, 4.9, 4.95, 4.95]))
    straight = train(tiny_config(corpus, tmp_path / "straight", train=schedule))
    monkeypatch.setattr(train_module, "teacher_forced_metrics", scripted([5.0, 4.8, 4.9, 4.95, 4.95]))
    train(tiny_config(corpus, tmp_path / "resumed", train={**schedule, "max_steps": 4}))
    resumed = train(tiny_config(corpus, tmp_path / "resumed", train=schedule))
    assert straight.state.step == resumed.state.step == 9 and "train.patience" in resumed.stop_reason
    assert resumed.state.best_valid_loss == 4.8 and resumed.state.best_scheduled_loss == 4.9


def test_a_run_without_last_pt_sets_the_step_files_it_finds_aside(corpus: dict, tmp_path: Path) -> None:
    """A run directory with an earlier run's step files but no last.pt starts afresh: left in place, the old files
    (newest by number) made rotation delete each new save."""
    run = tmp_path / "run"
    schedule = {"save_every": 2, "eval_every": 2, "keep_checkpoints": 2}
    train(tiny_config(corpus, run, train={**schedule, "max_steps": 8}))
    directory = run / "checkpoints"
    (directory / "last.pt").unlink()
    train(tiny_config(corpus, run, train={**schedule, "max_steps": 4}))
    assert [n for n, _ in step_files(directory)] == [2, 4]
    assert sorted(p.name for p in (directory / "after-step-000000").iterdir()) == ["step-000006.pt", "step-000008.pt"]


def test_tensorboard_drops_the_steps_a_resumed_run_logs_again(corpus: dict, tmp_path: Path) -> None:
    """After `ln -f step-6 last.pt`, steps 9 and 12 are logged twice; TensorBoard keeps the second run's only."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    schedule = {"max_steps": 12, "save_every": 3, "eval_every": 6, "log_every": 3, "tensorboard": True}
    train(tiny_config(corpus, run, train=schedule))
    (run / "checkpoints" / "last.pt").unlink()
    os.link(run / "checkpoints" / "step-000006.pt", run / "checkpoints" / "last.pt")
    train(tiny_config(corpus, run, train={**schedule, "lr": 1e-3}))
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [3, 6, 9, 12]
    assert [e.value for e in events.Scalars("train/loss")][2:] == pytest.approx(list(logged(run, "train_loss").values())[2:])


def test_the_step_that_ends_an_epoch_is_logged_in_that_epoch(corpus: dict, tmp_path: Path) -> None:
    """28 batches an epoch: step 28 ends the first, and its log line and records say epoch 1, not 2."""
    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"max_steps": 0, "max_epochs": 1, "log_every": 7, "eval_every": 28, "save_every": 28}))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(r["step"], r["epoch"]) for r in records if r["step"] == 28} == {(28, 1)}


def test_a_fine_tuned_run_resumed_without_init_from_keeps_where_it_started(corpus: dict, tmp_path: Path, caplog) -> None:
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    train(tiny_config(corpus, base, train={"max_steps": 3}))
    train(tiny_config(corpus, tuned, train={"max_steps": 3, "init_from": str(base)}))
    train(tiny_config(corpus, tuned, train={"max_steps": 4}))  # resumed without the setting
    assert load_checkpoint(tuned / "checkpoints" / "last.pt")["config"]["train"]["init_from"] == str(base)
    with caplog.at_level("WARNING", logger="nmtkit"):
        train(tiny_config(corpus, tuned, train={"max_steps": 5, "init_from": str(base)}))
    assert "started from scratch" not in caplog.text and "is not used" not in caplog.text


def test_a_checkpoint_without_training_state_as_last_pt_is_refused_naming_init_from(corpus: dict, tmp_path: Path) -> None:
    """`nmtkit average`'s output linked as last.pt: weights only, so there is nothing to resume."""
    from nmtkit.average import average_checkpoints
    from nmtkit.checkpoint import CheckpointError

    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"max_steps": 4, "save_every": 2, "eval_every": 2}))
    averaged = average_checkpoints(run, last=2).path
    (run / "checkpoints" / "last.pt").unlink()
    os.link(averaged, run / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=r"without a training state \(optimizer, scaler, train_state, rng missing\).*train\.init_from="):
        train(tiny_config(corpus, run, train={"max_steps": 6}))


def test_the_training_file_named_relatively_on_resume_is_the_same_file(corpus: dict, tmp_path: Path, monkeypatch) -> None:
    """An absolute data.train in the checkpoint, a relative one in the config: one file, so the run resumes."""
    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"max_steps": 3}))
    monkeypatch.chdir(corpus["train"].parent)
    result = train(tiny_config(corpus, run, data={"train": corpus["train"].name}, train={"max_steps": 4}))
    assert result.state.step == 4
