"""One training process per run directory: an exclusive flock on a lock file that names the owner's pid and host."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another live process is training in this run directory."""


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` refuses to enter while another process holds the lock; a lock left by a dead process
    (same host) is taken over with a log line.

    The lock is an exclusive `flock` on `train.lock`, held for the whole run and released by the kernel when the process
    ends, however it ends: two processes starting at once can't both take it (a pid file alone can: the second reads
    the first's file before its pid is written and takes it for stale). The file also names the owner's pid and host,
    for the error message, and for locks written by a process that does not flock (another host, an older nmtkit).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "train.lock"
        self.host = socket.gethostname()
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read(fd)
                os.close(fd)
                pid = owner[0] if owner else "unknown: it is starting"
                raise RunLockedError(
                    f"{self.path.parent} is in use by a training process (pid {pid}); wait for it, stop it, "
                    "or choose another train.run_dir"
                ) from None
            try:
                is_current = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                is_current = False
            if not is_current:  # the owner finished and removed this file between our open and our lock: again
                os.close(fd)
                continue
            try:
                self._check_owner(self._read(fd))
            except RunLockedError:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": self.host}).encode(), 0)
            self.fd = fd
            return self
        raise RunLockedError(f"could not take the lock {self.path}; remove it if no training runs there")

    @staticmethod
    def _read(fd: int) -> tuple[int, str] | None:
        """(pid, host) written in the lock file, or None when it is empty or unreadable."""
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"null")
            return int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _check_owner(self, owner: tuple[int, str] | None) -> None:
        """With the flock taken: raise if the file names a process that may still run without flocking (another
        host, or a live pid here that is not ours); otherwise log the takeover of a stale lock."""
        if owner is None:
            return
        pid, host = owner
        if host != self.host:
            raise RunLockedError(
                f"{self.path.parent} is locked by pid {pid} on host {host}; if that run is over, delete {self.path}"
            )
        if pid > 0 and pid != os.getpid() and _is_alive(pid):
            raise RunLockedError(
                f"{self.path.parent} is in use by a training process (pid {pid}); wait for it, stop it, "
                "or choose another train.run_dir"
            )
        log.info("taking over the stale lock %s (pid %d is not running)", self.path, pid)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.path.unlink(missing_ok=True)  # before the flock goes: a process that opened this file sees it is gone
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
