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
- Ctrl-C in the caller, or an error in its own item, kills the helpers at once. The steps that must not be cut
  halfway (forking the helpers, killing them) hold SIGINT and SIGTERM back until done.
- An error in a helper is raised again in the caller, with the helper's traceback as a note; one that cannot cross
  the process boundary arrives as a RuntimeError naming it. The caller notices it after its own current item (or at
  once when it has none left, whichever helper fails first) and takes no further item.
- A helper that dies (killed by the OS) or cannot be forked is a RuntimeError that names the settings to use instead.
  A helper's message carries its own length, so a process that `fn` forks and that keeps the pipe open cannot make
  the caller wait for the pipe's end.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from logging.handlers import QueueHandler
from typing import Any, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_NUMBER = 4  # bytes per item number in the work pipe
_LENGTH = 8  # bytes of the length that comes before a helper's message
DIED = (
    "a decoding worker process died before finishing its batch (killed by the OS, out of memory?); "
    "decode in this process with decode.workers: 1, or in threads with decode.processes: false"
)


def fork_available() -> bool:
    """Forked workers are used where fork is safe for torch: Linux (macOS's system libraries are not fork-safe)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


# Helpers that had sent their results but were still exiting when the caller went on: a process's exit tears down
# its copy of the page tables (~7 ms for 300 MB), which need not keep the caller waiting. Reaped when a later call
# starts or ends, so at most the last call's helpers are left as zombies meanwhile.
_exiting: list[int] = []


@dataclass
class _Helper:
    pid: int
    results: int  # read end of the pipe its results come through


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
                for helper in _finished(helpers, wait=False):  # a helper's error or death stops the caller here
                    _collect(helper, helpers, results)
        finally:
            torch.set_num_threads(threads)
        while helpers:  # whichever is ready first, so that an error is not kept waiting behind another's batch
            for helper in _finished(helpers, wait=True):
                _collect(helper, helpers, results)
    except BaseException:  # an error in one item, or Ctrl-C: the other items are not waited for
        with signals_held_back():
            _stop_now(helpers)
        raise
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
    return _Helper(pid, read)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, replaced by None, ...
            stream.flush()


def _finished(helpers: list[_Helper], wait: bool) -> list[_Helper]:
    """The helpers whose results (or end) can be read now; with `wait`, waits until there is one. (poll, not select:
    select cannot watch a file descriptor above 1023, which a process with many open files hands out.)"""
    if not helpers:
        return []
    watch = select.poll()
    for helper in helpers:
        watch.register(helper.results, select.POLLIN)
    ready = {fd for fd, _ in watch.poll(None if wait else 0)}  # POLLIN, or POLLHUP/POLLERR when a helper died
    return [h for h in helpers if h.results in ready]


def _collect(helper: _Helper, helpers: list[_Helper], results: list[Any]) -> None:
    """Read `helper`'s results and put them in `results` after replaying its log records here; raise its error, or a
    RuntimeError if it died first. Reaps the helper, or leaves that to a later call while it is still exiting."""
    message = _read_message(helper.results)
    with signals_held_back():  # Ctrl-C here would leave the helper half forgotten (its pipe closed, not reaped)
        helpers.remove(helper)
        os.close(helper.results)
        if not _reap(helper.pid, wait=False):
            _exiting.append(helper.pid)
    if message is None:
        raise RuntimeError(DIED)
    try:
        done = pickle.loads(message)
    except Exception as e:  # noqa: BLE001 - a log record or error that pickled but cannot be rebuilt here
        raise RuntimeError(f"could not read the results of a decoding worker process: {type(e).__name__}: {e}") from e
    for i, data, records in done:
        for record in records:
            logging.getLogger(record.name).handle(record)
        ok, value = pickle.loads(data)
        if not ok:
            _raise_remote(*value)
        results[i] = value


def _read_message(fd: int) -> bytes | None:
    """A helper's length-prefixed message, or None if the pipe ends first (the helper died). The length, not the
    end of the pipe, says when it is complete: a process that fn itself forked could hold the pipe open."""
    header = _read_exactly(fd, _LENGTH)
    if header is None:
        return None
    return _read_exactly(fd, int.from_bytes(header, "little"))


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _raise_remote(error: BaseException, remote_traceback: str) -> None:
    note = f"raised in a decoding worker process:\n{remote_traceback}"
    if not hasattr(error, "add_note"):  # Python 3.10
        raise error from RuntimeError(note)
    error.add_note(note)
    raise error


def _stop_now(helpers: list[_Helper]) -> None:
    """Kill the helpers (they ignore SIGINT and SIGTERM), then reap them and close their pipes."""
    for helper in helpers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper.pid, signal.SIGKILL)
    for helper in helpers:
        _reap(helper.pid, wait=True)
        with contextlib.suppress(OSError):
            os.close(helper.results)
    helpers.clear()


def _reap_exited() -> None:
    _exiting[:] = [pid for pid in _exiting if not _reap(pid, wait=False)]


def _reap(pid: int, wait: bool) -> bool:
    """Collect the exit status of helper `pid` (waiting for it to end if `wait`); whether it has ended. A helper that
    something else already reaped (an application's os.wait(), SIGCHLD ignored) counts as ended."""
    try:
        return os.waitpid(pid, 0 if wait else os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


@contextlib.contextmanager
def signals_held_back() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends, under the handlers that were in place
    (a KeyboardInterrupt, training's graceful stop, ...). Only the main thread receives signals; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    # A handler set outside Python (getsignal gives None) could not be put back: such a signal is left alone.
    held = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None]
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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
    except Exception as e:  # noqa: BLE001 - every error goes back to the caller
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


def _portable(e: Exception) -> Exception:
    """`e` if it survives a pickle round trip, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")
