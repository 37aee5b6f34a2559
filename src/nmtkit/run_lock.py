"""One training process per run directory: a lock file holding the owner's pid and host."""

from __future__ import annotations

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
    """`with RunLock(run_dir):` refuses to enter while a live process holds the lock; a lock left by
    a dead process (same host) is taken over with a log line."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "train.lock"
        self.host = socket.gethostname()

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_owner()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": self.host}, f)
            return self
        raise RunLockedError(f"could not take the lock {self.path}; remove it if no training runs there")

    def _check_owner(self) -> None:
        """Raise if the lock's owner is alive; otherwise remove the stale lock."""
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            pid, host = -1, self.host  # unreadable: treat as stale
        if host != self.host:
            raise RunLockedError(
                f"{self.path.parent} is locked by pid {pid} on host {host}; if that run is over, delete {self.path}"
            )
        if pid > 0 and pid != os.getpid() and _is_alive(pid):
            raise RunLockedError(
                f"{self.path.parent} is in use by a training process (pid {pid}); wait for it, stop it, "
                "or choose another train.run_dir"
            )
        log.info("removing stale lock %s (pid %d is not running)", self.path, pid)
        self.path.unlink(missing_ok=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.path.unlink(missing_ok=True)
