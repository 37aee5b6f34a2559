"""Resource faults: a device that isn't there, Ctrl-C (SIGINT) and SIGTERM, and a crash or out-of-memory
error in the middle of a run. None of them loses the last checkpoint or leaves the run directory locked."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    one_torch_thread,  # noqa: F401 (autouse: tiny models train on one thread)
    run_main,
    subprocess_env,
    train_command,
    wait_for,
    write_config,
)

from conftest import tiny_config
from nmtkit import train as train_module
from nmtkit.checkpoint import load_checkpoint
from nmtkit.device import DeviceError
from nmtkit.train import train

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@no_cuda
def test_cuda_without_a_gpu_raises_device_error_naming_train_device(corpus: dict, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="train.device or --device.*but torch sees no CUDA device.*use device: cpu or device: auto"):
        train(tiny_config(corpus, tmp_path / "run", train={"device": "cuda"}))
    assert not (tmp_path / "run").exists()  # refused before touching the run directory


@no_cuda
def test_cli_with_cuda_without_a_gpu_exits_2_naming_train_device(corpus: dict, tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run")
    code, out, err = run_main(["train", "--config", str(config), "--set", "train.device=cuda"])
    assert code == 2
    assert "nmtkit train: error: device 'cuda' was asked for (train.device" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # not even an empty train.log


@no_cuda
def test_translate_with_cuda_without_a_gpu_names_the_device_flag(trained_run: Path) -> None:
    code, out, err = run_main(["translate", "--checkpoint", str(trained_run), "--device", "cuda", "Hello."])
    assert code == 2 and "Traceback" not in err
    assert "--device" in err


@no_cuda
def test_device_auto_falls_back_to_cpu_and_the_run_records_why(corpus: dict, tmp_path: Path) -> None:
    train(tiny_config(corpus, tmp_path / "run", train={"device": "auto", "max_steps": 1}))
    (info,) = [json.loads(line) for line in (tmp_path / "run" / "run.jsonl").read_text().splitlines()]
    assert "device auto -> cpu (no CUDA device visible to torch)" in info["runtime"]


# Steps without end: only the signal stops these runs.
ENDLESS = {"max_steps": 100_000, "log_every": 2, "eval_every": 100_000, "save_every": 100_000}
# Steps a run may take after the last one metrics.jsonl showed when the signal went: the log trails by up to one
# (log_every 2), and one step is in flight. (An exit time limit failed on loaded machines: the interpreter's shutdown
# alone took 2-8 s there, long after the run had stopped.)
AFTER_THE_SIGNAL = 3


@pytest.mark.parametrize("where", ["before the tokenizer", "inside SentencePiece's input"])
def test_a_signal_before_the_first_step_stops_the_setup_at_once(where: str, corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Training a tokenizer and encoding a large corpus take minutes, with nothing to save: the setup does not go on
    to its end before the run stops. SentencePiece reads its sentences from a Python iterator and reports an
    exception raised there as its own failure: a Ctrl-C there is still an interruption, not a tokenizer error."""
    from nmtkit import run_tokenizer
    from nmtkit.cli import main

    if where == "before the tokenizer":
        real = train_module.prepare_tokenizer

        def interrupted(*args: object, **kwargs: object) -> object:
            os.kill(os.getpid(), signal.SIGINT)
            return real(*args, **kwargs)

        monkeypatch.setattr(train_module, "prepare_tokenizer", interrupted)
    else:
        real_texts = run_tokenizer.iter_texts

        def texts_then_interrupt(*args: object, **kwargs: object):
            for i, text in enumerate(real_texts(*args, **kwargs)):
                if i == 50:
                    os.kill(os.getpid(), signal.SIGINT)
                yield text

        monkeypatch.setattr(run_tokenizer, "iter_texts", texts_then_interrupt)
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tmp_path / "tiny.yaml", corpus, run_dir, train={"max_steps": 2}))]) == 130
    err = capsys.readouterr().err
    assert "SIGINT received before the first step: stopping now, with nothing trained" in err and "SentencePiece" not in err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "train.lock").exists()
    assert not list((run_dir / "tokenizer").glob("*.model")) if (run_dir / "tokenizer").exists() else True


def interrupt_training(config: Path, run_dir: Path, sig: signal.Signals) -> tuple[subprocess.CompletedProcess, int]:
    """Start `nmtkit train`, send `sig` once metrics.jsonl logs step 2 or later, and wait for the exit (a hang fails
    at 30 s): (the finished process, the last step metrics.jsonl had logged when the signal went)."""
    metrics = run_dir / "metrics.jsonl"

    def logged_step() -> int:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)

    proc = subprocess.Popen(train_command(config), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: logged_step() >= 2 or proc.poll() is not None, 120, "a logged step >= 2", poll=0.02)
        logged = logged_step()
        proc.send_signal(sig)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=30)
        print(f"{sig.name} to exit: {time.monotonic() - t0:.2f}s (most of it the interpreter's shutdown)")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stopped_at(stdout: str, signal_name: str) -> int:
    """The step in the CLI's last line, which must say the run was interrupted by `signal_name`."""
    match = re.search(rf"interrupted by {signal_name}; run the same command to resume; step (\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


def test_ctrl_c_stops_cleanly_saves_the_step_and_the_run_resumes_from_it(corpus: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", corpus, run_dir, train=ENDLESS)
    stopped, logged = interrupt_training(config, run_dir, signal.SIGINT)
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGINT received: stopping after this step" in stopped.stderr
    step = stopped_at(stopped.stdout, "SIGINT")
    assert step <= logged + AFTER_THE_SIGNAL
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == step
    assert not (run_dir / "train.lock").exists()

    with caplog.at_level(logging.INFO, logger="nmtkit"):
        resumed = train(tiny_config(corpus, run_dir, train={**ENDLESS, "max_steps": step + 2}))
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at step {step} " in caplog.text
    assert resumed.state.step == step + 2


def test_sigterm_stops_cleanly_and_saves_the_step(corpus: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stopped, logged = interrupt_training(write_config(tmp_path / "tiny.yaml", corpus, run_dir, train=ENDLESS), run_dir, signal.SIGTERM)
    assert stopped.returncode == 0, stopped.stderr
    step = stopped_at(stopped.stdout, "SIGTERM")
    assert step <= logged + AFTER_THE_SIGNAL
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == step


def crash_at_step(monkeypatch: pytest.MonkeyPatch, step: int, error: BaseException) -> None:
    """Make train_step raise `error` on its `step`-th call."""
    real_step = train_module.train_step
    calls = 0

    def failing_step(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == step:
            raise error
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", failing_step)


def test_out_of_memory_batch_is_skipped_logged_and_training_goes_on(corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """CPU stand-in for a CUDA out-of-memory in one batch: it is skipped and counted, with advice."""
    run_dir = tmp_path / "run"
    crash_at_step(monkeypatch, 3, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    with caplog.at_level("WARNING", logger="nmtkit"):
        result = train(tiny_config(corpus, run_dir, train={"max_steps": 6}))
    assert result.state.step == 6 and result.state.oom_skipped == 1
    assert "out of memory on batch" in caplog.text and "train.max_tokens" in caplog.text


def test_out_of_memory_mid_run_keeps_the_last_checkpoint_and_releases_the_lock(corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With train.skip_oom_batches false the error propagates, and the run directory stays resumable."""
    run_dir = tmp_path / "run"
    train(tiny_config(corpus, run_dir, train={"max_steps": 6}))
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    crash_at_step(monkeypatch, 3, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    with pytest.raises(torch.OutOfMemoryError):
        train(tiny_config(corpus, run_dir, train={"max_steps": 12, "save_every": 2, "skip_oom_batches": False}))
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() != before  # step 8 was saved before the crash at 9
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 8
    assert not (run_dir / "train.lock").exists()
    monkeypatch.undo()
    assert train(tiny_config(corpus, run_dir, train={"max_steps": 12, "save_every": 2, "skip_oom_batches": False})).state.step == 12


@needs_cuda
def test_real_cuda_out_of_memory_keeps_the_last_checkpoint_and_releases_the_lock(corpus: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    gpu = {"device": "cuda", "precision": "fp32", "skip_oom_batches": False}
    big = {"d_model": 4096, "n_heads": 32, "d_ff": 16384}
    train(tiny_config(corpus, run_dir, model=big, train={**gpu, "max_steps": 0, "max_epochs": 0, "max_minutes": 0.0001}))
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    torch.cuda.set_per_process_memory_fraction(0.001)  # ~100 MB; the model below needs several GB
    try:
        with pytest.raises(torch.OutOfMemoryError):
            train(tiny_config(corpus, run_dir, model=big, train={**gpu, "max_steps": 4}))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert not (run_dir / "train.lock").exists()


def test_fp16_on_cpu_is_refused_naming_both_ways_to_set_it(trained_run: Path, corpus: dict, tmp_path: Path) -> None:
    code, out, err = run_main(["translate", "--checkpoint", str(trained_run), "--device", "cpu", "--precision", "fp16", "Hello."])
    assert code == 2 and "precision fp16 (train.precision or --precision) is for CUDA" in err and "Traceback" not in err
    with pytest.raises(DeviceError, match=r"precision fp16 \(train.precision or --precision\) is for CUDA"):
        train(tiny_config(corpus, tmp_path / "run", train={"device": "cpu", "precision": "fp16"}))
    assert not (tmp_path / "run").exists()
