"""Data-parallel training through torchrun on CPU (gloo): two processes train like one process
with the same global batch, a two-"node" rendezvous on 127.0.0.1 works, and a distributed run
resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_tree

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, corpus: dict, run_dir: Path, **train: object) -> Path:
    tree = tiny_tree(corpus, run_dir, model={"dropout": 0.0}, train={"max_steps": 6, "log_every": 1, "eval_every": 6, "save_every": 6, **train})
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def torchrun(*args: str, timeout: int = 240) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
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
    finish(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "nmtkit", "train", "--config", str(config)))
    one, two = losses(single), losses(tmp_path / "run")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
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
