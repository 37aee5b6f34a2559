"""Data-parallel training through torchrun on CPU (gloo): two processes train like one process
with the same global batch, a two-"node" rendezvous on 127.0.0.1 works, and a distributed run
resumes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import nmtkit
from conftest import tiny_tree

# a traceback line in one of nmtkit's own files (a checkout's folder may itself be named nmtkit, and torchrun's own
# traceback names files under it)
THROUGH_NMTKIT = 'File "' + re.escape(os.path.dirname(nmtkit.__file__)) + "/"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A line every 2 steps and an evaluation and a save at step 3: the save at 3 reads the log window mid-way (its sum
# over ranks goes into the checkpoint), and the line at 4 must still count each rank's loss once.
SCHEDULE = {"max_steps": 6, "log_every": 2, "eval_every": 3, "save_every": 3}


def write_config(path: Path, corpus: dict, run_dir: Path, **train: object) -> Path:
    tree = tiny_tree(corpus, run_dir, model={"dropout": 0.0}, train={**SCHEDULE, **train})
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def single(corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, two micro-batches accumulated per step: the reference loss curve."""
    d = tmp_path_factory.mktemp("single")
    config = write_config(d / "c.yaml", corpus, d / "run", accum_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "nmtkit", "train", "--config", str(config)], check=True, env=env, capture_output=True)
    return d / "run"


def test_two_processes_train_like_one_process_with_the_same_global_batch(corpus: dict, single: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run")
    out = finish(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "nmtkit", "train", "--config", str(config)))
    # rank 0 alone logs and reports: one tokenizer line, one summary
    assert out.count("| tokenizer: ") == 1 and [line.startswith(f"run {tmp_path / 'run'}:") for line in out.splitlines()].count(True) == 1, out
    one, two = losses(single), losses(tmp_path / "run")
    assert sorted(one) == sorted(two) == [2, 4, 6]
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])


def test_two_node_rendezvous_on_localhost_trains_and_then_resumes(corpus: dict, single: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run")
    port = free_port()
    nodes = [
        torchrun("--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=nmtkit-test", "-m", "nmtkit", "train", "--config", str(config))
        for rank in (0, 1)
    ]
    for node in nodes:
        finish(node)
    assert losses(tmp_path / "run") == pytest.approx(losses(single), abs=1e-5)
    # resume the distributed run on one process, two micro-batches per step, for 2 more steps
    subprocess.run(
        [sys.executable, "-m", "nmtkit", "train", "--config", str(config), "--set", "train.max_steps=8"],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert max(losses(tmp_path / "run")) == 8


def test_two_processes_fine_tune_from_another_runs_checkpoint(corpus: dict, single: Path, tmp_path: Path) -> None:
    """train.init_from under torchrun: rank 0 writes the checkpoint's tokenizer, the other rank waits and reads it, and
    both start from the same weights (a different start on one rank would fail DDP's first broadcast check or diverge)."""
    from nmtkit.checkpoint import load_checkpoint
    from nmtkit.tokenizer import Tokenizer

    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run", init_from=str(single), lr=1e-12, warmup_steps=0, max_steps=2)
    out = finish(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "nmtkit", "train", "--config", str(config)))
    assert "from train.init_from" in out
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").fingerprint == Tokenizer.load(single / "tokenizer").fingerprint
    start = load_checkpoint(single / "checkpoints" / "best.pt")["model"]
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert max((after[k].float() - start[k].float()).abs().max().item() for k in start) < 1e-6


def workers(agent_pid: int) -> dict[int, int]:
    """torchrun's worker processes by rank: {RANK: pid} (Linux /proc). Each runs in a session of its own."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # not a process, gone, or not ours to read
            continue
        ranks = [v[len(b"RANK="):] for v in env if v.startswith(b"RANK=")]
        if ppid == agent_pid and ranks:
            found[int(ranks[0])] = int(entry.name)
    return found


@contextlib.contextmanager
def killed_if_hanging(proc: subprocess.Popen) -> Iterator[dict[int, int]]:
    """Yields a dict for the run's workers by rank (`workers`); should the test fail with the run still going, kills
    them and torchrun: a rank that hangs in a collective only takes SIGTERM as a request to stop."""
    ranks: dict[int, int] = {}
    try:
        yield ranks
    finally:
        if proc.poll() is None:
            for pid in [*ranks.values(), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


def output_or_kill(proc: subprocess.Popen, timeout: int = 120) -> str:
    """The run's output once it ends; a run still going after `timeout` (the hang a test is there to catch) is killed
    with its workers, not torchrun alone."""
    with killed_if_hanging(proc) as ranks:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            ranks.update(workers(proc.pid))
            raise
    return out


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through Linux /proc")


@needs_proc
def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(corpus: dict, tmp_path: Path) -> None:
    """SIGTERM reaches rank 1 only: rank 0 must stop at the same step (not wait in the next all-reduce) and save."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", corpus, run_dir, max_steps=100_000, eval_every=100_000, save_every=100_000, log_every=1)
    proc = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "nmtkit", "train", "--config", str(config))
    with killed_if_hanging(proc) as ranks:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < 3:  # a few steps trained
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        ranks.update(workers(proc.pid))
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGTERM)
        out = finish(proc, timeout=60)
    assert "stopped: stopped by another rank" in out
    step = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 3 <= step < 100_000 and max(losses(run_dir)) == step


@needs_proc
def test_a_signal_to_one_rank_during_the_setup_stops_every_rank_before_the_first_step(corpus: dict, tmp_path: Path) -> None:
    """Rank 1 has its stop request before the loop starts (a sitecustomize module, which every Python process of the
    run imports at start-up, sets it as the training enters `StopSignal`): rank 0 must not start training alone."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from nmtkit import stop_signal\n"
        "    enter = stop_signal.StopSignal.__enter__\n"
        "    def signalled(self):\n"
        "        enter(self)\n"
        "        self.requested = 'SIGTERM'\n"
        "        return self\n"
        "    stop_signal.StopSignal.__enter__ = signalled\n"
    )
    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    proc = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "nmtkit", "train", "--config", str(config), env=env)
    with killed_if_hanging(proc) as ranks:
        deadline = time.time() + 60
        while len(ranks) < 2 and proc.poll() is None and time.time() < deadline:  # noted, to kill them on a hang
            ranks.update(workers(proc.pid))
            time.sleep(0.1)
        out = finish(proc, timeout=60)
    assert "no step to train: stopped by another rank" in out
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or losses(tmp_path / "run") == {}


def test_a_run_directory_that_cannot_be_created_stops_every_rank_with_the_error(corpus: dict, tmp_path: Path) -> None:
    """Not only a refusal: any failure of rank 0's lock reaches rank 1 before its first collective."""
    (tmp_path / "a file").write_text("")
    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "a file" / "run")
    proc = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "nmtkit", "train", "--config", str(config))
    out = output_or_kill(proc)
    assert proc.returncode != 0
    assert "nmtkit train: error: cannot create the run directory" in out  # rank 0
    assert "nmtkit train: error: rank 0 could not take the lock" in out  # rank 1
    assert not re.search(THROUGH_NMTKIT, out) and "Connection closed" not in out  # no traceback through nmtkit (torchrun prints its own)


def test_a_run_directory_locked_by_another_process_stops_every_rank_with_the_lock_error(corpus: dict, tmp_path: Path) -> None:
    """Rank 0 alone takes the lock; its refusal must reach rank 1 as an error too, not as a broken collective."""
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "train.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        (tmp_path / "run" / "train.log").write_text("the live run's log\n")
        config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run")
        proc = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "nmtkit", "train", "--config", str(config))
        out = output_or_kill(proc)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert f"nmtkit train: error: {tmp_path / 'run'} is in use by a training process (pid {holder.pid})" in out  # rank 0
    assert "nmtkit train: error: rank 0 could not take the lock" in out  # rank 1
    # each rank exits with its message, not in a broken collective (torchrun still prints its own summary of the exits)
    assert not re.search(THROUGH_NMTKIT, out) and "Connection closed" not in out  # no traceback through nmtkit (torchrun prints its own)
    assert (tmp_path / "run" / "train.log").read_text() == "the live run's log\n"  # the refused job wrote nothing there


@needs_proc
def test_an_epoch_with_fewer_batches_than_one_step_takes_is_an_error_not_a_silent_spin(corpus: dict, tmp_path: Path) -> None:
    """28 batches an epoch, 2 processes x accum_steps 15 = 30 a step: every epoch would be skipped as too short."""
    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run", accum_steps=15)
    proc = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "nmtkit", "train", "--config", str(config))
    out = output_or_kill(proc)
    assert proc.returncode != 0
    assert "fewer than one step takes (train.accum_steps=15 on each of 2 processes)" in out


def test_a_distributed_run_with_dropout_resumes_bit_for_bit(corpus: dict, tmp_path: Path) -> None:
    """Each rank saves and restores its own random states: with rank 0's alone, rank 1 went on with rank 0's dropout
    stream, and the resumed run drifted from the uninterrupted one."""
    def config(name: str, max_steps: int) -> Path:
        tree = tiny_tree(corpus, tmp_path / name, model={"dropout": 0.1}, train={**SCHEDULE, "max_steps": max_steps})
        path = tmp_path / f"{name}-{max_steps}.yaml"
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
        return path

    def run(path: Path) -> None:
        finish(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "nmtkit", "train", "--config", str(path)))

    run(config("straight", 6))
    run(config("resumed", 3))
    run(config("resumed", 6))
    # the window the stop at 3 cut is summed over ranks in another order after the resume: equal to fp32 rounding
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    a, b = (torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=False)["model"] for name in ("straight", "resumed"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0

