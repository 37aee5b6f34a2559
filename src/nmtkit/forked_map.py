"""`[fn(item) for item in items]` by forked worker processes, for the CPU decoding workers (decode_workers.py).

A worker is forked for one call and gets `fn` and the items through the fork itself (copy-on-write: nothing is
pickled on the way in, so `fn` may be a closure over a model); it sends each result back pickled. What makes this
safe to use from a command line program:

- Workers ignore SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and the caller decides what it means.
  They die with the caller (PR_SET_PDEATHSIG), so a caller killed by SIGTERM or `timeout` leaves none behind
  holding its stdout open.
- Ctrl-C in the caller while results are awaited kills the workers at once instead of finishing every item. The
  steps that must not be cut halfway (forking the workers, killing them) hold SIGINT and SIGTERM back until done.
- An exception in `fn` is raised again in the caller, with the worker's traceback as a note; one that cannot cross
  the process boundary arrives as a RuntimeError naming it.
- Log records from `fn` reach the caller's handlers, in order, as they would from a thread.

Workers run one intra-op thread each: GNU OpenMP's thread pool does not survive a fork (a child that starts a
parallel region hangs).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from logging.handlers import QueueHandler
from multiprocessing import get_context
from typing import Any, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def fork_available() -> bool:
    """Forked workers are used where fork is safe for torch: Linux (macOS's system libraries are not fork-safe)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def map_in_forked_processes(fn: Callable[[Item], Result], items: Sequence[Item], workers: int) -> list[Result]:
    """[fn(item) for item in items], in order, by `workers` forked processes; results must be picklable."""
    pool, futures = None, []
    try:
        with signals_held_back():
            pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_start_worker, initargs=(fn, items, os.getpid()))
            futures = [pool.submit(_run_in_worker, i) for i in range(len(items))]
        results = [_unpack(future.result()) for future in futures]
    except BaseException as e:  # an error in one item, or Ctrl-C: the other items are not waited for
        if pool is not None:
            with signals_held_back():
                _stop_now(pool)
        if isinstance(e, BrokenProcessPool):
            raise RuntimeError(
                "a decoding worker process died before finishing its batch (killed by the OS, out of memory?); "
                "decode in this process with decode.workers: 1, or in threads with decode.processes: false"
            ) from e
        if isinstance(e, OSError) and not futures:  # the fork itself failed (no memory, too many processes)
            raise RuntimeError(f"could not start decoding worker processes ({e}); decode in threads with decode.processes: false") from e
        raise
    with signals_held_back():
        pool.shutdown()
    return results


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


def _stop_now(pool: ProcessPoolExecutor) -> None:
    """Kill the workers (they ignore SIGINT and SIGTERM) and drop the items not started; returns once the pool's
    own thread has ended too, so that the caller is single-threaded again."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public way to them before Python 3.14
        process.kill()
        process.join()
    pool.shutdown(wait=True, cancel_futures=True)


# -- inside a worker -------------------------------------------------------------------------------------------

# What a worker runs, set by the initializer's arguments, which fork hands over unpickled.
_fn: Callable[[Any], Any] | None = None
_items: Sequence[Any] = ()
_log_records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()


def _start_worker(fn: Callable[[Any], Any], items: Sequence[Any], parent: int) -> None:
    global _fn, _items
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # die with the caller, even by SIGKILL
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the caller died before the line above
        os._exit(1)
    torch.set_num_threads(1)
    # Every log record goes back with its item's result, to be handled by the caller's loggers and handlers: as
    # from a thread, and printed once. (`prepare` formats the message and any traceback into plain text.)
    keep = QueueHandler(_log_records)

    def handle(logger: logging.Logger, record: logging.LogRecord) -> None:
        try:
            keep.enqueue(keep.prepare(record))
        except Exception:  # noqa: BLE001 - a bad log call (e.g. wrong arguments) is reported, as logging does, not raised
            keep.handleError(record)

    logging.Logger.handle = handle  # type: ignore[method-assign,assignment]
    _fn, _items = fn, items


def _run_in_worker(i: int) -> bytes:
    assert _fn is not None
    try:
        outcome: tuple[bool, Any] = (True, _fn(_items[i]))
        # Plain pickle: torch's multiprocessing pickler would send tensors through shared-memory files, not bytes.
        data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - every error goes back to the caller
        data = pickle.dumps((False, (_portable(e), traceback.format_exc())), protocol=pickle.HIGHEST_PROTOCOL)
    records = []
    while not _log_records.empty():
        records.append(_picklable(_log_records.get()))
    return pickle.dumps((data, records), protocol=pickle.HIGHEST_PROTOCOL)


def _picklable(record: logging.LogRecord) -> logging.LogRecord:
    """`record`, or where an attribute of its own (`extra=`) cannot be pickled, the record without them."""
    try:
        pickle.dumps(record)
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


def _unpack(message: bytes) -> Any:
    """A worker's message -> its result, after replaying its log records here; or raise its error."""
    data, records = pickle.loads(message)
    for record in records:
        logging.getLogger(record.name).handle(record)
    ok, value = pickle.loads(data)
    if ok:
        return value
    error, remote_traceback = value
    note = f"raised in a decoding worker process:\n{remote_traceback}"
    if not hasattr(error, "add_note"):  # Python 3.10
        raise error from RuntimeError(note)
    error.add_note(note)
    raise error
