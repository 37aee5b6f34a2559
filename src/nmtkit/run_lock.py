"""One training process per run directory: an exclusive flock on a lock file that names the owner's pid and host."""

from __future__ import annotations

import errno
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
    except (ProcessLookupError, OverflowError):  # no such process; a number no process can have
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# errno values of a file system without flock (Lustre without -o flock, some network mounts): the lock falls back
# to the pid in the file alone
_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}


class RunLock:
    """`with RunLock(run_dir):` refuses to enter while another process holds the lock; a lock left by a dead process
    (same host) is taken over with a log line.

    The lock is an exclusive `flock` on `train.lock`, held for the whole run and released by the kernel when the process
    ends, however it ends: two processes starting at once can't both take it (a pid file alone can: the second reads
    the first's file before its pid is written and takes it for stale). The file also names the owner's pid and host,
    for the error message, for another host's runs (refused always: some file systems lock within one machine only),
    and for locks written without a flock (an older nmtkit, a file system without flock, where this lock falls back to
    the pid alone).
    """

    _held: set[str] = set()  # lock files this process holds: a second entry is refused (flock alone may allow it)

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "train.lock"
        self.host = socket.gethostname()
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunLockedError(f"cannot create the run directory {self.path.parent} ({e}); fix train.run_dir") from None
        key = str(self.path.resolve())
        if key in RunLock._held:
            raise RunLockedError(f"{self.path.parent} is already in use by a training run of this process")
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunLockedError(f"cannot open the lock {self.path} ({e}); check its owner and permissions") from None
            try:
                has_flock = self._flock(fd)
                if has_flock and not self._is_at_path(fd):  # the owner finished and removed it before our lock: again
                    os.close(fd)
                    continue
                self._check_owner(self._read(fd), has_flock)
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": self.host, "flock": has_flock}).encode(), 0)
                except OSError as e:
                    raise RunLockedError(f"cannot write the lock {self.path} ({e}); free some space there") from None
            except BaseException:
                os.close(fd)  # a refusal or a failure (a full disk) leaves no descriptor, and no flock, behind
                raise
            self.fd = fd
            RunLock._held.add(key)
            return self
        raise RunLockedError(f"could not take the lock {self.path}; remove it if no training runs there")

    def _flock(self, fd: int) -> bool:
        """Take the flock: True, or False on a file system without flock; RunLockedError while another process has it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by a training process (pid {owner[0] if owner else 'unknown: it is starting'});"
                " wait for it, stop it, or choose another train.run_dir"
            ) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise RunLockedError(f"cannot lock {self.path} ({e}); check the file system of train.run_dir") from None
            log.warning("%s: this file system has no flock (%s); the lock relies on the pid it holds", self.path, e.strerror)
            return False
        return True

    def _is_at_path(self, fd: int) -> bool:
        try:
            mine, there = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    @staticmethod
    def _read(fd: int) -> tuple[int, str, bool] | None:
        """(pid, host, whether it held a flock) written in the lock file, or None when it is empty or unreadable."""
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"null")
            return int(owner["pid"]), str(owner["host"]), bool(owner.get("flock", False))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _check_owner(self, owner: tuple[int, str, bool] | None, has_flock: bool) -> None:
        """Raise if the file names a process that may still run. Another host's is refused always: some file systems
        lock within one machine only. Here, one that held a flock is over once we hold it (its pid may be reused by
        now); one that did not (an older nmtkit, no flock here) is judged by its pid. Otherwise log the takeover."""
        if owner is None:
            return
        pid, host, owner_flocked = owner
        if host != self.host:
            raise RunLockedError(
                f"{self.path.parent} is locked by pid {pid} on host {host}; if that run is over, delete {self.path}"
            )
        if not (has_flock and owner_flocked) and pid > 0 and pid != os.getpid() and _is_alive(pid):
            raise RunLockedError(
                f"{self.path.parent} is in use by a training process (pid {pid}); wait for it, stop it, "
                "or choose another train.run_dir"
            )
        log.info("taking over the stale lock %s (its owner, pid %d, no longer holds it)", self.path, pid)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.fd is None:
            return
        try:
            if self._is_at_path(self.fd):  # not a file someone put there after deleting ours
                self.path.unlink(missing_ok=True)  # before the flock goes: a process that opened this file sees it is gone
        except OSError as e:  # never in place of the run's own error
            log.warning("could not remove the lock %s (%s); delete it by hand", self.path, e)
        finally:
            os.close(self.fd)
            self.fd = None
            RunLock._held.discard(str(self.path.resolve()))
