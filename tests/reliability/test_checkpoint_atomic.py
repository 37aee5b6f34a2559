"""Atomic checkpoints: a save killed at any moment, or failing on a full disk, never costs the previous
checkpoint, and keep-N rotation never deletes the checkpoint that last.pt or best.pt names."""

from __future__ import annotations

import errno
import functools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    one_torch_thread,  # noqa: F401 (autouse: tiny models train on one thread)
    subprocess_env,
    wait_for,
)

from nmtkit import checkpoint
from nmtkit.checkpoint import CheckpointError, checkpoint_dir, load_checkpoint, resolve_checkpoint, save_checkpoint

BIG = 1_000_000  # floats: a 4 MB tensor, so that a save takes long enough to be killed half-way


def state_at(step: int, size: int = 1000) -> dict:
    """A checkpoint-shaped state whose tensor holds `step` everywhere, so a torn or stale file shows."""
    return {"config": {}, "tokenizer": {}, "model": {"w": torch.full((size,), float(step))}, "step": step}


def loaded_step(path: Path) -> int:
    """Load a checkpoint, check that its tensor holds its step everywhere, and return the step."""
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.full_like(state["model"]["w"], float(state["step"]))), path
    return state["step"]


# One process imports torch once, then forks a fresh saver per round, which the test kills: a kill costs a
# fork, not a second of `import torch`. Each saver saves step after step, appending each finished step
# to the progress file.
SAVER = f"""
import os, sys
import torch
from nmtkit.checkpoint import save_checkpoint

torch.set_num_threads(1)
run_dir, progress = sys.argv[1], sys.argv[2]
for line in sys.stdin:  # one line per round: the step to start from
    step = int(line)
    pid = os.fork()
    if pid == 0:
        while True:
            state = {{"config": {{}}, "tokenizer": {{}}, "model": {{"w": torch.full(({BIG},), float(step))}}, "step": step}}
            save_checkpoint(run_dir, state, step, is_best=step % 3 == 0, keep=2)
            with open(progress, "a") as f:
                f.write(f"{{step}}\\n")
            step += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_checkpoints_survive_sigkill_at_random_moments_of_saving(tmp_path: Path) -> None:
    run_dir, progress = tmp_path / "run", tmp_path / "progress.txt"
    progress.touch()
    rng = random.Random(20240611)

    def finished_steps() -> list[int]:
        return [int(s) for s in progress.read_text().split()]

    def is_saved(step: int) -> bool:
        return step in finished_steps()

    kills, mid_write, step, pid = 15, 0, 1, 0
    saver = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(run_dir), str(progress)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )
    assert saver.stdin is not None and saver.stdout is not None
    try:
        for _ in range(kills):
            saver.stdin.write(f"{step}\n")
            saver.stdin.flush()
            pid = int(saver.stdout.readline())
            wait_for(functools.partial(is_saved, step), 60, f"the save of step {step}")  # the saver is ready
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            assert saver.stdout.readline().strip() == "reaped"
            pid = 0

            finished = max(finished_steps())
            mid_write += any(checkpoint_dir(run_dir).glob(".*.tmp"))  # killed while writing a file
            last = loaded_step(resolve_checkpoint(run_dir, prefer="last"))
            assert last >= finished  # no save that finished is lost
            if (checkpoint_dir(run_dir) / "best.pt").exists():
                assert loaded_step(checkpoint_dir(run_dir) / "best.pt") % 3 == 0
            step = last + 1
    finally:
        if pid:  # a round that failed half-way leaves its saver running
            os.kill(pid, signal.SIGKILL)
        saver.kill()
        saver.wait()
    print(f"survived {kills} of {kills} SIGKILLs during saves ({mid_write} left a half-written temporary file); last step {step - 1}")


def test_rotation_keeps_an_early_best_checkpoint_that_fell_out_of_the_newest_n(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, state_at(step), step, is_best=step == 1, keep=1)
    directory = checkpoint_dir(tmp_path)
    assert sorted(p.name for p in directory.glob("step-*.pt")) == ["step-000005.pt"]
    assert loaded_step(directory / "best.pt") == 1
    assert loaded_step(directory / "last.pt") == 5


def test_without_hard_links_last_and_best_are_copies_that_survive_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hard_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "link", no_hard_links)
    for step in range(1, 5):
        save_checkpoint(tmp_path, state_at(step), step, is_best=step == 2, keep=1)
    directory = checkpoint_dir(tmp_path)
    assert loaded_step(directory / "best.pt") == 2
    assert loaded_step(directory / "last.pt") == 4
    assert not list(directory.glob(".*.tmp"))


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "copies"])
def test_checkpoint_files_are_read_only_and_later_saves_still_replace_and_rotate_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool) -> None:
    """last.pt, best.pt and the newest step file are one file: without write permission, `cp step-N.pt last.pt`
    fails instead of rewriting best.pt too. nmtkit's own saves rename new files into place, which needs none."""
    if not links:
        monkeypatch.setattr(checkpoint.os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    for step in range(1, 5):
        save_checkpoint(tmp_path, state_at(step), step, is_best=step in (1, 3), keep=2)
    directory = checkpoint_dir(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "last.pt", "step-000003.pt", "step-000004.pt"]
    assert (loaded_step(directory / "best.pt"), loaded_step(directory / "last.pt")) == (3, 4)
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o222 == 0, path
        assert path.stat().st_mode & 0o444 == 0o444 & ~current_umask(), path  # readable as a plain file would be


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_full_disk_raises_checkpoint_error_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, state_at(1), 1, is_best=True, keep=2)

    def disk_full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, state_at(2), 2, is_best=True, keep=2)
    message = str(info.value)
    assert str(checkpoint_dir(tmp_path) / "step-000002.pt") in message
    assert "No space left on device" in message and "previous checkpoint is untouched" in message
    monkeypatch.undo()
    directory = checkpoint_dir(tmp_path)
    assert loaded_step(directory / "last.pt") == 1
    assert loaded_step(directory / "best.pt") == 1
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "last.pt", "step-000001.pt"]  # no temporary files


def test_full_disk_while_copying_last_pt_without_hard_links_keeps_the_previous_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hard_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "link", no_hard_links)
    save_checkpoint(tmp_path, state_at(1), 1, is_best=True, keep=2)

    def disk_full_half_way(src: object, dst: object) -> None:
        Path(str(dst)).write_bytes(b"half a copy")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.shutil, "copyfile", disk_full_half_way)
    with pytest.raises(CheckpointError, match=r"last\.pt at step-000002\.pt: .*No space left on device.*is as it was before this save"):
        save_checkpoint(tmp_path, state_at(2), 2, is_best=False, keep=2)
    monkeypatch.undo()
    directory = checkpoint_dir(tmp_path)
    assert loaded_step(directory / "last.pt") == 1 and not list(directory.glob(".*.tmp"))


def test_checkpoints_are_readable_by_the_run_directorys_other_users(tmp_path: Path) -> None:
    """As any file the process writes under its umask (027 here: the group may read), not mkstemp's owner-only 0600;
    read-only (see the test above)."""
    import os
    import stat

    umask = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path, state_at(1), 1, is_best=True, keep=2)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o440
    assert stat.S_IMODE((checkpoint_dir(tmp_path) / "best.pt").stat().st_mode) == 0o440


def test_next_save_removes_temporary_files_left_by_a_killed_save(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, state_at(1), 1, is_best=False, keep=2)
    directory = checkpoint_dir(tmp_path)
    stale = [directory / ".step-000002.pt.k3j9x2.tmp", directory / ".last.pt.link.tmp", directory / ".best.pt.link.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path, state_at(2), 2, is_best=False, keep=2)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in directory.iterdir()) == ["last.pt", "step-000001.pt", "step-000002.pt"]


def test_a_file_system_that_refuses_modes_still_takes_the_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only files are a safeguard, not a condition: some network mounts refuse chmod."""
    def no_modes(fd: int, mode: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "fchmod", no_modes)
    save_checkpoint(tmp_path, state_at(1), 1, is_best=True, keep=2)
    assert loaded_step(checkpoint_dir(tmp_path) / "last.pt") == 1
