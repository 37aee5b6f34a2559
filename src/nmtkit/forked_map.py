"""`[fn(item) for item in items]` by the caller and forked helper processes, for the CPU decoding workers
(decode_workers.py).

The caller is one of the workers: it forks `workers - 1` helpers and then runs `fn` on items itself, each worker
taking the next item nobody has taken yet (a pipe holds the item numbers; a read of one number is atomic). Helpers
get `fn` and the items through the fork itself (copy-on-write: nothing is pickled on the way in, so `fn` may be a
closure over a model), and send their results back pickled, all at once when no item is left. A fork copies the
page tables of a process that holds a model (~7 ms for 300 MB) and a child's exit tears them down again (~7 ms), so
each call forks one process fewer than it has workers, uses no pool machinery, and does not wait for a helper's exit
once its results are in (the next call reaps it). Against a pool of `workers` processes this made a benchmark call
(512 sentences, 2 workers) 3-5% faster, ~940 -> ~900 ms.

What makes this safe to use from a command line program:
- Helpers ignore SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and the caller decides what it means.
  They die with the caller (PR_SET_PDEATHSIG), so a caller killed by SIGTERM or `timeout` leaves none behind
  holding its stdout open.
- Ctrl-C in the caller (a second one too), or an error in its own item, kills the helpers at once. The steps that
  must not be cut halfway (forking the helpers, forgetting a finished one, killing them) hold SIGINT and SIGTERM back
  until done.
- An error in a helper is raised again in the caller, with the helper's traceback as a note; one that cannot cross
  the process boundary arrives as a RuntimeError naming it. The caller notices it after its own current item (or at
  once when it has none left, whichever helper fails first) and takes no further item.
- A helper that dies (killed by the OS) or cannot be forked is a RuntimeError that names the settings to use instead,
  never a hang. The caller watches each helper's exit through a pidfd (Linux 5.3+), and a helper's message carries
  its own length: a process that `fn` forks and that keeps the pipe open can neither delay the results nor hide the
  helper's death. The pidfd also keeps a pid that the OS reused from being taken for a helper's.
- Log records from a helper reach the caller's handlers, each once and in the helper's order, when the helper's
  results arrive (as late as from a thread that is slow to report).

Every worker runs one intra-op thread (the caller's thread count is restored afterwards): GNU OpenMP's thread pool
does not survive a fork (a child that starts a parallel region hangs).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import pickle
import queue
import select
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from logging.handlers import QueueHandler
from typing import Any, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_NUMBER = 4  # bytes per item number in the work pipe
_LENGTH = 8  # bytes of the length that comes before a helper's message
_HELD = (signal.SIGINT, signal.SIGTERM)  # what signals_held_back and _stop_now hold back
DIED = (
    "a decoding worker process died before finishing its batch (killed by the OS, out of memory?); "
    "decode in this process with decode.workers: 1, or in threads with decode.processes: false"
)


def fork_available() -> bool:
    """Forked workers are used where fork is safe for torch: Linux (macOS's system libraries are not fork-safe)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


@dataclass
class _Process:
    pid: int
    ended: int | None  # a pidfd, readable once the process has exited (None where the kernel has none: Linux < 5.3)


@dataclass
class _Helper(_Process):
    results: int = -1  # read end of the pipe its results come through, non-blocking
    received: bytearray = field(default_factory=bytearray)

    def message(self) -> bytes | None:
        """Its message (which starts with its own length) once every byte of it has arrived."""
        if len(self.received) < _LENGTH:
            return None
        end = _LENGTH + int.from_bytes(self.received[:_LENGTH], "little")
        return bytes(self.received[_LENGTH:end]) if len(self.received) >= end else None


# Helpers that had sent their results but were still exiting when the caller went on: a process's exit tears down
# its copy of the page tables (~7 ms for 300 MB), which need not keep the caller waiting. Reaped when a later call
# starts or ends, so at most the last call's helpers are left as zombies meanwhile.
_exiting: list[_Process] = []


def map_in_forked_processes(fn: Callable[[Item], Result], items: Sequence[Item], workers: int) -> list[Result]:
    """[fn(item) for item in items], in order, by the caller and `workers - 1` forked helpers; the helpers' results
    must be picklable."""
    _flush_std_streams()  # a helper must not write out the caller's buffered output again (before signals are held)
    work = _work_pipe(len(items))
    if work is None:  # more items than a pipe can hold: in parts
        half = len(items) // 2
        return map_in_forked_processes(fn, items[:half], workers) + map_in_forked_processes(fn, items[half:], workers)
    results: list[Any] = [None] * len(items)
    helpers: list[_Helper] = []
    try:
        _reap_exited()
        with signals_held_back():
            for _ in range(workers - 1):
                helpers.append(_fork_helper(fn, items, work))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            while (i := _take(work)) is not None:
                results[i] = fn(items[i])
                _progress(helpers, results, wait=False)  # a helper's error or death stops the caller here
        finally:
            torch.set_num_threads(threads)
        while helpers:  # on all of them at once, so that an error is not kept waiting behind another's batch
            _progress(helpers, results, wait=True)
    finally:
        try:
            if helpers:  # an error in one item, or Ctrl-C (a second one too): the other items are not waited for
                _stop_now(helpers)
        finally:
            os.close(work)
    _reap_exited()  # the previous call's helpers have surely ended by now
    return results


def _work_pipe(n: int) -> int | None:
    """The read end of a pipe holding the numbers 0..n-1 with its write end closed (so that an empty pipe reads as
    the end), or None where the pipe cannot hold n numbers."""
    read, write = os.pipe()
    try:
        size = fcntl.fcntl(write, fcntl.F_GETPIPE_SZ)
        if n * _NUMBER > size:
            with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size
                size = fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, n * _NUMBER)
        if n * _NUMBER > size:
            os.close(read)
            return None
        data = memoryview(b"".join(i.to_bytes(_NUMBER, "little") for i in range(n)))
        while data:
            data = data[os.write(write, data) :]
        return read
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)


def _take(work: int) -> int | None:
    """The next item number nobody has taken, or None when none is left. Pipe reads are atomic under Linux's pipe
    lock, and every number was written before any reader started, so each read gets one whole number."""
    data = os.read(work, _NUMBER)
    return int.from_bytes(data, "little") if data else None


def _fork_helper(fn: Callable[[Any], Any], items: Sequence[Any], work: int) -> _Helper:
    parent = os.getpid()
    read, write = os.pipe()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns that a process with OS threads may deadlock a forked child. Here those threads are
            # torch's idle intra-op (OpenMP) workers, which the helper never uses (one thread), and a caller with
            # Python threads of its own decodes in threads instead (decode_workers.uses_processes).
            warnings.filterwarnings("ignore", r"This process \(pid=\d+\) is multi-threaded", DeprecationWarning)
            pid = os.fork()
    except OSError as e:  # no memory, too many processes
        os.close(read)
        os.close(write)
        raise RuntimeError(f"could not start decoding worker processes ({e}); decode in threads with decode.processes: false") from e
    if pid == 0:  # the helper: never returns into the caller's code
        status = 1
        try:
            os.close(read)
            _run_helper(fn, items, work, write, parent)
            status = 0
        finally:
            _flush_std_streams()  # what fn printed; os._exit skips Python's own shutdown
            os._exit(status)
    os.close(write)
    os.set_blocking(read, False)
    try:
        ended: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3 (or a Python built without it): a death is seen when the pipe ends
        ended = None
    return _Helper(pid, ended, read)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, replaced by None, ...
            stream.flush()


def _progress(helpers: list[_Helper], results: list[Any], wait: bool) -> None:
    """Read what the helpers have sent (with `wait`, wait until one has sent or ended) and finish each helper whose
    message is complete, or which has ended without completing it. (poll, not select: select cannot watch a file
    descriptor above 1023, which a process with many open files hands out.)"""
    if not helpers:
        return
    watch = select.poll()
    for helper in helpers:
        watch.register(helper.results, select.POLLIN)  # POLLHUP and POLLERR come anyway
        if helper.ended is not None:
            watch.register(helper.ended, select.POLLIN)
    ready = {fd for fd, _ in watch.poll(None if wait else 0)}
    for helper in [h for h in helpers if h.results in ready or h.ended in ready]:
        pipe_ended = _drain(helper)
        message = helper.message()
        # A helper writes its whole message before it exits, so once it has exited (or its pipe has ended) an
        # incomplete message means it died. The pidfd sees the exit even when a process that fn forked holds the
        # pipe open.
        if message is not None or pipe_ended or helper.ended in ready:
            _finish(helper, helpers, message, results)


def _drain(helper: _Helper) -> bool:
    """Append what can be read from `helper`'s pipe now to what it sent before; whether the pipe has ended."""
    while True:
        try:
            chunk = os.read(helper.results, 1 << 20)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        helper.received += chunk


def _finish(helper: _Helper, helpers: list[_Helper], message: bytes | None, results: list[Any]) -> None:
    """Forget `helper` (reaping it, or leaving that to a later call while it is still exiting), then put its results
    in `results` after replaying its log records here; raise its error, or a RuntimeError if it died first."""
    with signals_held_back():  # Ctrl-C here would leave the helper half forgotten (its pipe closed, not reaped)
        helpers.remove(helper)
        os.close(helper.results)
        _exiting.append(_Process(helper.pid, helper.ended))
        _reap_exited()  # this one too, if it has ended already
    if message is None:
        raise RuntimeError(DIED)
    for i, data, records in pickle.loads(message):  # bytes and records that were rebuilt in the helper already
        for record in records:
            logging.getLogger(record.name).handle(record)
        try:
            ok, value = pickle.loads(data)
        except Exception as e:  # noqa: BLE001 - a result or error that pickles but cannot be rebuilt here
            raise RuntimeError(
                f"the result of a decoding worker process could not be rebuilt here ({type(e).__name__}: {e}); "
                "decode in threads with decode.processes: false"
            ) from e
        if not ok:
            _raise_remote(*value)
        results[i] = value


def _raise_remote(error: BaseException, remote_traceback: str) -> None:
    note = f"raised in a decoding worker process:\n{remote_traceback}"
    if not hasattr(error, "add_note"):  # Python 3.10
        raise error from RuntimeError(note)
    error.add_note(note)
    raise error


def _stop_now(helpers: list[_Helper]) -> None:
    """Kill the helpers (they ignore SIGINT and SIGTERM), then reap them and close their pipes, with SIGINT and SIGTERM
    blocked until done (they are delivered afterwards): a second Ctrl-C must not leave a helper running."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        for helper in helpers:
            with contextlib.suppress(ProcessLookupError):
                if helper.ended is not None:
                    signal.pidfd_send_signal(helper.ended, signal.SIGKILL)
                else:
                    os.kill(helper.pid, signal.SIGKILL)
        for helper in helpers:
            _reap(helper, wait=True)
            _close_pidfd(helper)
            with contextlib.suppress(OSError):
                os.close(helper.results)
        helpers.clear()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _reap_exited() -> None:
    still = []
    for process in _exiting:
        if _reap(process, wait=False):
            _close_pidfd(process)
        else:
            still.append(process)
    _exiting[:] = still


def _reap(process: _Process, wait: bool) -> bool:
    """Collect the exit status of `process` (waiting for it to end if `wait`); whether it has ended. Through its pidfd
    where there is one, so that a pid the application reaped and the OS reused is never mistaken for it; one that
    something else already reaped (an application's os.wait(), SIGCHLD ignored) counts as ended."""
    try:
        if process.ended is not None:
            return os.waitid(os.P_PIDFD, process.ended, os.WEXITED | (0 if wait else os.WNOHANG)) is not None
        return os.waitpid(process.pid, 0 if wait else os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


def _close_pidfd(process: _Process) -> None:
    if process.ended is not None:
        with contextlib.suppress(OSError):
            os.close(process.ended)
        process.ended = None


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_held_back() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends, each one and in order, under the
    handlers that were in place (a KeyboardInterrupt, training's graceful stop, ...). Only the main thread receives
    signals; elsewhere a no-op. The handlers are swapped with both signals blocked, so that one arriving mid-swap
    reaches a whole set of handlers, never a half-restored one."""
    if not _on_main_thread():
        yield
        return
    arrived: list[int] = []
    # A handler set outside Python (getsignal gives None) could not be put back: such a signal is left alone.
    held = [sig for sig in _HELD if signal.getsignal(sig) is not None]
    previous: dict[int, Any] = {}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:  # a signal that came just before the block runs its own handler here, which may raise: then undo
        for sig in held:
            previous[sig] = signal.signal(sig, lambda signum, frame: arrived.append(signum))
    except BaseException:
        _restore(previous, blocked)
        raise
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            _restore(previous, blocked)  # a signal blocked meanwhile reaches the restored handlers
        finally:
            _replay(arrived)


def _restore(previous: dict[int, Any], blocked: set[int | signal.Signals]) -> None:
    """Put the handlers back (with the signals blocked; then the mask as it was)."""
    try:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _replay(arrived: list[int]) -> None:
    raised: list[BaseException] = []
    for signum in arrived:  # each one, in order: a second Ctrl-C is what aborts training at once
        try:
            signal.raise_signal(signum)
        except BaseException as e:  # noqa: BLE001 - the first is raised below, after every signal had its turn
            raised.append(e)
    if raised:
        raise raised[0]


# -- inside a helper -------------------------------------------------------------------------------------------


def _run_helper(fn: Callable[[Any], Any], items: Sequence[Any], work: int, out: int, parent: int) -> None:
    """Take items until none is left or one fails, then send (number, pickled outcome, log records) for each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # die with the caller, even by SIGKILL
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the caller died before the line above
        return
    torch.set_num_threads(1)
    records = _keep_log_records()
    done = []
    while (i := _take(work)) is not None:
        data, ok = _outcome(fn, items[i])
        done.append((i, data, [_picklable(records.get()) for _ in range(records.qsize())]))
        if not ok:
            break
    body = pickle.dumps(done, protocol=pickle.HIGHEST_PROTOCOL)
    message = memoryview(len(body).to_bytes(_LENGTH, "little") + body)
    while message:
        message = message[os.write(out, message) :]
    os.close(out)  # the caller reads the end of the results now, not once this process has finished exiting


def _outcome(fn: Callable[[Any], Any], item: Any) -> tuple[bytes, bool]:
    """fn(item) pickled as (True, result), or (False, (error, traceback)); plain pickle (torch's multiprocessing
    pickler would send tensors through shared-memory files, not bytes)."""
    try:
        return pickle.dumps((True, fn(item)), protocol=pickle.HIGHEST_PROTOCOL), True
    except BaseException as e:  # noqa: BLE001 - every error goes back to the caller, sys.exit() too
        return pickle.dumps((False, (_portable(e), traceback.format_exc())), protocol=pickle.HIGHEST_PROTOCOL), False


def _keep_log_records() -> queue.SimpleQueue[logging.LogRecord]:
    """From now on every log record in this process goes to the returned queue, to be handled by the caller's loggers
    and handlers: as from a thread, and printed once. (`prepare` formats the message and any traceback into text.)"""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    keep = QueueHandler(records)

    def handle(logger: logging.Logger, record: logging.LogRecord) -> None:
        try:
            keep.enqueue(keep.prepare(record))
        except Exception:  # noqa: BLE001 - a bad log call (e.g. wrong arguments) is reported, as logging does, not raised
            keep.handleError(record)

    logging.Logger.handle = handle  # type: ignore[method-assign,assignment]
    return records


def _picklable(record: logging.LogRecord) -> logging.LogRecord:
    """`record`, or where an attribute of its own (`extra=`) cannot be pickled and rebuilt, the record without them."""
    try:
        pickle.loads(pickle.dumps(record))
        return record
    except Exception:  # noqa: BLE001
        keep = ("name", "msg", "levelname", "levelno", "pathname", "filename", "module", "lineno", "funcName", "created",
                "msecs", "relativeCreated", "thread", "threadName", "processName", "process")
        return logging.makeLogRecord({k: getattr(record, k, None) for k in keep} | {"args": None})


def _portable(e: BaseException) -> BaseException:
    """`e` if it survives a pickle round trip, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")
