"""Concurrency and paths: one training process per run directory (a lock file naming pid and host), and
run directories, data files and configs under paths with spaces and non-ASCII characters."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_helpers import (
    one_torch_thread,  # noqa: F401 (autouse: tiny models train on one thread)
    run_main,
    write_config,
)

from conftest import tiny_config
from nmtkit.run_lock import RunLockedError
from nmtkit.train import train


def write_lock(run_dir: Path, pid: int, host: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "train.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host}))
    return lock


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a process that is alive for the whole test."""
    proc = subprocess.Popen(["sleep", "30"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_lock_of_a_live_process_refuses_training_naming_the_pid(corpus: dict, tmp_path: Path, live_pid: int) -> None:
    lock = write_lock(tmp_path / "run", live_pid, socket.gethostname())
    before = lock.read_text()
    with pytest.raises(RunLockedError, match=rf"in use by a training process \(pid {live_pid}\)"):
        train(tiny_config(corpus, tmp_path / "run"))
    assert lock.read_text() == before  # the other run's lock is left alone
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_exits_2_when_the_run_directory_is_locked(corpus: dict, tmp_path: Path, live_pid: int) -> None:
    write_lock(tmp_path / "run", live_pid, socket.gethostname())
    code, out, err = run_main(["train", "--config", str(write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run"))])
    assert code == 2
    assert f"(pid {live_pid})" in err and "Traceback" not in err


def test_lock_of_a_dead_process_is_taken_over(corpus: dict, tmp_path: Path) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    lock = write_lock(tmp_path / "run", ended.pid, socket.gethostname())
    assert train(tiny_config(corpus, tmp_path / "run", train={"max_steps": 2})).state.step == 2
    assert not lock.exists()  # released at the end


def test_a_second_process_is_refused_even_before_the_owner_has_written_its_pid(tmp_path: Path) -> None:
    """Two runs starting at once: the second may read the lock file while it is still empty. It must not take that
    for a stale lock (the kernel's flock says the owner is alive), and must leave the owner's file alone."""
    import sys

    from nmtkit.run_lock import RunLock

    take = f"from nmtkit.run_lock import RunLock; RunLock({str(tmp_path / 'run')!r}).__enter__()"
    with RunLock(tmp_path / "run") as lock:
        lock.path.write_text("")  # as the file is between its creation and its first write
        proc = subprocess.run([sys.executable, "-c", take], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "RunLockedError" in proc.stderr and "pid unknown: it is starting" in proc.stderr
        assert lock.path.exists()
    assert not lock.path.exists()
    proc = subprocess.run([sys.executable, "-c", take], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # free again once the owner is done


def test_a_lock_whose_owner_held_the_flock_is_taken_over_even_if_its_pid_lives_again(tmp_path: Path, live_pid: int) -> None:
    """After a crash the file keeps the dead owner's pid, which a container may soon give to another process: the
    kernel's flock, not the pid, says whether the owner still runs."""
    from nmtkit.run_lock import RunLock

    lock = tmp_path / "run" / "train.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": live_pid, "host": socket.gethostname(), "flock": True}))
    with RunLock(tmp_path / "run"):
        assert json.loads(lock.read_text())["pid"] != live_pid


def test_another_hosts_lock_is_refused_even_when_its_owner_held_a_flock(tmp_path: Path) -> None:
    """Some file systems lock within one machine only: a flock taken here says nothing about a run on another host."""
    from nmtkit.run_lock import RunLock

    lock = tmp_path / "run" / "train.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 4242, "host": "gpu-node-7.example", "flock": True}))
    with pytest.raises(RunLockedError, match=r"locked by pid 4242 on host gpu-node-7\.example"):
        RunLock(tmp_path / "run").__enter__()


def test_a_run_directory_that_cannot_be_created_is_a_lock_error_naming_it(tmp_path: Path) -> None:
    from nmtkit.run_lock import RunLock

    (tmp_path / "a file").write_text("")
    with pytest.raises(RunLockedError, match="cannot create the run directory .*a file/run.*fix train.run_dir"):
        RunLock(tmp_path / "a file" / "run").__enter__()


def test_without_flock_the_lock_falls_back_to_the_pid_it_holds(tmp_path: Path, live_pid: int, monkeypatch, caplog) -> None:
    import errno

    from nmtkit import run_lock

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)  # as on Lustre without -o flock
    with caplog.at_level("WARNING", logger="nmtkit"), run_lock.RunLock(tmp_path / "free"):
        pass
    assert "has no flock" in caplog.text
    write_lock(tmp_path / "taken", live_pid, socket.gethostname())
    with pytest.raises(RunLockedError, match=rf"pid {live_pid}"):
        run_lock.RunLock(tmp_path / "taken").__enter__()


def test_a_second_entry_by_the_same_process_is_refused_and_a_failed_unlink_never_masks_the_run(tmp_path: Path, monkeypatch, caplog) -> None:
    from nmtkit import run_lock

    with run_lock.RunLock(tmp_path / "run") as outer:
        with pytest.raises(RunLockedError, match="already in use by a training run of this process"):
            run_lock.RunLock(tmp_path / "run").__enter__()
        assert outer.path.exists()

        def cannot(self: Path, missing_ok: bool = False) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(run_lock.Path, "unlink", cannot)
        with caplog.at_level("WARNING", logger="nmtkit"):
            outer.__exit__(None, None, None)  # logs, and raises nothing in place of the run's own error
    assert "could not remove the lock" in caplog.text
    monkeypatch.undo()
    with run_lock.RunLock(tmp_path / "run"):  # released all the same: the flock went with the descriptor
        pass


def test_a_flock_that_fails_otherwise_is_a_lock_error_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    import errno

    from nmtkit import run_lock

    def broken(fd: int, operation: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(run_lock.fcntl, "flock", broken)
    with pytest.raises(RunLockedError, match=r"cannot lock .*train\.lock .*Input/output error"):
        run_lock.RunLock(tmp_path / "run").__enter__()


def test_a_lock_that_could_not_be_written_leaves_no_flock_behind(tmp_path: Path, monkeypatch) -> None:
    import errno

    from nmtkit import run_lock

    def disk_full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_lock.os, "pwrite", disk_full)
    with pytest.raises(RunLockedError, match="cannot write the lock .*No space left on device"):
        run_lock.RunLock(tmp_path / "run").__enter__()
    monkeypatch.undo()
    with run_lock.RunLock(tmp_path / "run"):  # the same process may take it: no descriptor kept the flock
        pass


def test_an_owner_leaves_alone_a_lock_file_that_replaced_its_own(tmp_path: Path) -> None:
    """Someone deletes the owner's lock file (as the refusal message allows) and a second run takes a new one: the
    first run's exit must not delete the second's."""
    from nmtkit.run_lock import RunLock

    first = RunLock(tmp_path / "run").__enter__()
    first.path.unlink()
    first.path.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "flock": False}))  # the second run's
    first.__exit__(None, None, None)
    assert first.path.exists()


def test_lock_from_another_host_refuses_training_naming_the_host(corpus: dict, tmp_path: Path) -> None:
    write_lock(tmp_path / "run", 12345, "gpu-node-7.example")
    with pytest.raises(RunLockedError, match=r"locked by pid 12345 on host gpu-node-7\.example; if that run is over, delete"):
        train(tiny_config(corpus, tmp_path / "run"))


def test_train_translate_and_evaluate_work_under_paths_with_spaces_and_non_ascii(corpus: dict, tmp_path: Path) -> None:
    data = tmp_path / "my data" / "en→zh 语料"
    data.mkdir(parents=True)
    spaced = {split: Path(shutil.copy(path, data / f"{split} set.jsonl")) for split, path in corpus.items()}
    run_dir = tmp_path / "my runs" / "模型 1"
    config = write_config(tmp_path / "my configs" / "tiny 配置.yaml", spaced, run_dir, train={"max_steps": 2})

    code, out, err = run_main(["train", "--config", str(config)])
    assert code == 0, err
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    code, out, err = run_main(["translate", "--checkpoint", str(run_dir), "--device", "cpu", "Hello."])
    assert code == 0, err
    assert len(out.splitlines()) == 1
    code, out, err = run_main(["evaluate", "--checkpoint", str(run_dir), "--device", "cpu", "--json", "--no-bleu"])
    assert code == 0, err
    assert json.loads(out)["sentences"] == 40
