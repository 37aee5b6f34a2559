"""Forked worker processes (forked_map.py): results in order, errors and log records back in the caller, and no worker
outliving its caller, whether it ends normally, by an error, by Ctrl-C or by SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from nmtkit.decode_workers import uses_processes
from nmtkit.forked_map import fork_available, map_in_forked_processes, signals_held_back

pytestmark = pytest.mark.skipif(not fork_available(), reason="forked workers need Linux")
ROOT = Path(__file__).resolve().parents[1]


def _live_children() -> list[int]:
    """This process's children that are still running (zombies waiting to be reaped don't count)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(ppid) == os.getpid() and state != "Z":
            children.append(int(stat.parent.name))
    return children


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


@pytest.fixture(autouse=True)
def _ctrl_c_raises_keyboard_interrupt():
    """Python's own SIGINT handler, even where the test run was started with SIGINT ignored (a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _pool_threads() -> list[threading.Thread]:
    """Threads a process pool left running in this process (the caller must be alone again to fork next time)."""
    return [t for t in threading.enumerate() if "Executor" in type(t).__name__]


def pid_threads_and_square(i: int) -> tuple[int, int, torch.Tensor]:
    return os.getpid(), torch.get_num_threads(), torch.tensor([i]) ** 2


def test_results_come_back_whole_and_in_order_from_one_thread_workers_other_than_the_caller() -> None:
    torch.set_num_threads(2)
    results = map_in_forked_processes(pid_threads_and_square, list(range(7)), workers=2)
    assert [int(t) for _, _, t in results] == [i * i for i in range(7)]  # tensors come back whole, in order
    pids = {pid for pid, _, _ in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {threads for _, threads, _ in results} == {1}
    assert torch.get_num_threads() == 2
    assert not _live_children() and not _pool_threads()


def test_an_error_comes_back_with_the_workers_traceback_and_the_other_workers_are_stopped() -> None:
    def fn(i: int) -> int:
        if i == 0:
            raise ValueError("batch 0 is bad")
        time.sleep(60)
        return i

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="batch 0 is bad") as info:
        map_in_forked_processes(fn, list(range(6)), workers=2)
    assert time.perf_counter() - t0 < 20  # not 60 s per remaining batch
    assert "raised in a decoding worker process" in "".join(getattr(info.value, "__notes__", [])) + str(info.value.__cause__)
    assert not _live_children() and not _pool_threads()


class NeedsTwoArguments(Exception):
    def __init__(self, what: str, where: int) -> None:
        super().__init__(f"{what} at {where}")  # pickles, but cannot be rebuilt from its args


def test_an_error_that_cannot_cross_the_process_boundary_is_named_not_mistaken_for_a_dead_worker() -> None:
    def fn(i: int) -> int:
        raise NeedsTwoArguments("odd failure", i)

    with pytest.raises(RuntimeError, match="NeedsTwoArguments: odd failure at 0") as info:
        map_in_forked_processes(fn, [0, 1], workers=2)
    assert "died" not in str(info.value)


def test_a_worker_killed_mid_batch_is_an_error_naming_the_settings_not_a_hang() -> None:
    def fn(i: int) -> int:
        if i == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # what the OS's out-of-memory killer does
        return i

    with pytest.raises(RuntimeError, match=r"decoding worker process died.*decode.workers: 1.*decode.processes: false"):
        map_in_forked_processes(fn, list(range(4)), workers=2)
    assert not _live_children()


def test_workers_ignore_ctrl_c_and_sigterm_so_the_caller_decides_when_to_stop() -> None:
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group; the caller decides what they mean
    def fn(i: int) -> int:
        os.kill(os.getpid(), signal.SIGTERM if i % 2 else signal.SIGINT)
        return i

    assert map_in_forked_processes(fn, list(range(4)), workers=2) == [0, 1, 2, 3]


def test_ctrl_c_in_the_caller_kills_the_workers_at_once_and_a_later_call_forks_again() -> None:
    def fn(i: int) -> int:
        time.sleep(60)  # every batch is still running or queued when the caller is interrupted
        return i

    t0 = time.perf_counter()
    ctrl_c = subprocess.Popen(["sh", "-c", f"sleep 1; kill -INT {os.getpid()}"])  # not a thread: the caller stays alone
    with pytest.raises(KeyboardInterrupt):
        map_in_forked_processes(fn, list(range(6)), workers=2)
    ctrl_c.wait()
    assert time.perf_counter() - t0 < 20
    assert not _live_children() and not _pool_threads()
    assert uses_processes(2)  # this process is single-threaded again: decoding forks its workers
    assert map_in_forked_processes(pid_threads_and_square, [3], workers=1)[0][0] != os.getpid()


def test_a_signal_inside_signals_held_back_takes_effect_when_the_block_ends() -> None:
    reached_the_end = False
    with pytest.raises(KeyboardInterrupt):
        with signals_held_back():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # a signal is handled between bytecodes: it would have interrupted by now
            reached_the_end = True
    assert reached_the_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_every_signal_held_back_is_delivered_in_order_a_double_ctrl_c_included() -> None:
    # training's handler: the first Ctrl-C asks for a graceful stop, the second aborts; neither may be lost
    seen: list[str] = []

    def handler(signum: int, frame: object) -> None:
        seen.append(signal.Signals(signum).name)
        if seen.count("SIGINT") == 2:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held_back():
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
                    os.kill(os.getpid(), sig)
                    time.sleep(0.05)
                assert seen == []
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    assert seen == ["SIGINT", "SIGTERM", "SIGINT"]


def test_workers_die_with_a_caller_killed_by_sigterm(tmp_path: Path) -> None:
    # `timeout 10 nmtkit translate ... | cat` must end: workers left behind would hold the pipe open for ever
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, time
        from nmtkit.forked_map import map_in_forked_processes
        def fn(i):
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(60)
        map_in_forked_processes(fn, list(range(4)), workers=2)
    """)
    caller = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    deadline = time.time() + 30
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    workers = [int(pid) for pid in pids.read_text().split()]
    assert len(workers) == 2
    caller.send_signal(signal.SIGTERM)
    caller.wait(timeout=30)
    deadline = time.time() + 10
    while any(_state(pid) not in ("Z", "gone") for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if _state(pid) not in ("Z", "gone")]
    for pid in survivors:  # leave nothing running if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors


def _collecting_logger(name: str) -> tuple[logging.Logger, list[str]]:
    """A logger of its own whose messages land in the returned list (in the calling process)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(name)
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, seen


def test_log_records_from_the_workers_reach_the_callers_handlers_once_in_order() -> None:
    logger, seen = _collecting_logger("nmtkit.test_forked_map")

    def fn(i: int) -> int:
        logger.debug("not at this level")
        logger.warning("source %d truncated", i)
        if i == 2:
            try:
                raise ValueError("why")
            except ValueError:
                logger.exception("batch %d", i)
        return i

    assert map_in_forked_processes(fn, [0, 1, 2], workers=2) == [0, 1, 2]
    assert seen[:3] == ["source 0 truncated", "source 1 truncated", "source 2 truncated"]
    assert len(seen) == 4 and seen[3].startswith("batch 2") and "ValueError: why" in seen[3]


def test_a_broken_log_call_in_a_worker_is_reported_and_the_batch_goes_on_as_in_a_thread(capfd) -> None:
    logger, seen = _collecting_logger("nmtkit.test_forked_map.broken")

    def fn(i: int) -> int:
        logger.warning("batch %d of %d", i)  # one argument short: logging reports it and goes on
        logger.warning("with an unpicklable extra", extra={"lock": threading.Lock()})
        return i

    assert map_in_forked_processes(fn, [0, 1], workers=2) == [0, 1]
    assert seen == ["with an unpicklable extra"] * 2
    assert "--- Logging error ---" in capfd.readouterr().err
