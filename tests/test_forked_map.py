"""Forked helper processes beside the caller (forked_map.py): results in order, errors and log records back in the
caller, and no helper outliving its caller, whether it ends normally, by an error, by Ctrl-C or by SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import nmtkit.forked_map
from nmtkit.decode_workers import uses_processes
from nmtkit.forked_map import fork_available, map_in_forked_processes, signals_held_back

pytestmark = pytest.mark.skipif(not fork_available(), reason="forked workers need Linux")
ROOT = Path(__file__).resolve().parents[1]


def _children(state: str | None = None) -> list[int]:
    """This process's children, or those in one state ("Z": exited, waiting to be reaped)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pstate, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(ppid) == os.getpid() and (state is None or pstate == state):
            children.append(int(stat.parent.name))
    return children


def _live_children(within: float = 5.0) -> list[int]:
    """This process's children still running after `within` seconds (zombies waiting to be reaped don't count: a
    helper whose results are in may still be exiting when the call returns)."""
    deadline = time.time() + within
    while True:
        live = [pid for pid in _children() if pid not in _children("Z")]
        if not live or time.time() > deadline:
            return live
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


class Hung(Exception):
    pass


@pytest.fixture(autouse=True)
def _a_hang_fails_the_test():
    """A call that would wait for ever fails after 60 s instead of holding up the suite."""
    def fail(signum: int, frame: object) -> None:
        raise Hung("still waiting after 60 s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _ctrl_c_raises_keyboard_interrupt():
    """Python's own SIGINT handler, even where the test run was started with SIGINT ignored (a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def pid_threads_and_square(i: int) -> tuple[int, int, torch.Tensor]:
    return os.getpid(), torch.get_num_threads(), torch.tensor([i]) ** 2


def pid_threads_and_square_slowly(i: int) -> tuple[int, int, torch.Tensor]:
    """Slow enough that a helper, forked before the caller starts on the items, gets some of them."""
    time.sleep(0.2)
    return pid_threads_and_square(i)


def _in_caller(caller: int) -> bool:
    return os.getpid() == caller


def only_in_a_helper(act: Callable[[int], object]) -> Callable[[int], object]:
    """An fn that runs act(i) in a helper, and in the caller an item slow enough for the helper to take some."""
    caller = os.getpid()

    def fn(i: int) -> object:
        if _in_caller(caller):
            time.sleep(0.3)
            return i
        return act(i)

    return fn


def test_results_come_back_whole_and_in_order_from_the_caller_and_its_helpers_each_on_one_thread() -> None:
    torch.set_num_threads(2)
    results = map_in_forked_processes(pid_threads_and_square_slowly, list(range(7)), workers=2)
    assert [int(t) for _, _, t in results] == [i * i for i in range(7)]  # tensors come back whole, in order
    pids = {pid for pid, _, _ in results}
    assert os.getpid() in pids and len(pids) == 2  # the caller is one of the two workers
    assert {threads for _, threads, _ in results} == {1}
    assert torch.get_num_threads() == 2  # the caller's own count is back
    assert not _live_children()


def test_every_item_is_taken_exactly_once_however_the_workers_race_for_them(tmp_path: Path) -> None:
    ran = tmp_path / "ran"  # every run of fn, from any process: appends of one short line each are atomic

    def fn(i: int) -> int:
        fd = os.open(ran, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{i} {os.getpid()}\n".encode())
        os.close(fd)
        time.sleep(0.002)  # long enough for the helpers to start while items are left
        return i * i

    assert map_in_forked_processes(fn, list(range(500)), workers=3) == [i * i for i in range(500)]
    runs = [line.split() for line in ran.read_text().splitlines()]
    assert sorted(int(i) for i, _ in runs) == list(range(500))  # none twice, none left out
    assert len({pid for _, pid in runs}) > 1  # the helpers took some too
    assert not _live_children()


def test_more_items_than_a_default_pipe_holds_come_back_whole_also_when_split_in_parts(monkeypatch) -> None:
    n = 20_000  # 80 kB of item numbers: more than a pipe's default 64 KiB, so the pipe is enlarged
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) >= n * 4:
        work = nmtkit.forked_map._work_pipe(n)
        assert work is not None  # enlarged, not split
        os.close(work)
    assert map_in_forked_processes(abs, list(range(-n, 0)), workers=2) == list(range(n, 0, -1))
    parts = []
    work_pipe = nmtkit.forked_map._work_pipe

    def small_pipe(count: int) -> int | None:  # a pipe that cannot be enlarged beyond 8 numbers
        parts.append(count)
        return None if count > 8 else work_pipe(count)

    monkeypatch.setattr(nmtkit.forked_map, "_work_pipe", small_pipe)
    assert map_in_forked_processes(abs, list(range(-25, 0)), workers=2) == list(range(25, 0, -1))
    assert sum(c for c in parts if c <= 8) == 25


def test_a_helper_still_exiting_when_the_call_returns_is_reaped_by_a_later_call() -> None:
    helpers: set[int] = set()
    for _ in range(4):
        results = map_in_forked_processes(pid_threads_and_square_slowly, [0, 1, 2], workers=3)
        helpers |= {pid for pid, _, _ in results} - {os.getpid()}
    assert len(helpers) >= 4
    assert len([pid for pid in helpers if _state(pid) != "gone"]) <= 2  # the last call's at most, not every call's
    time.sleep(1)  # long enough for them to have ended
    map_in_forked_processes(pid_threads_and_square, [0], workers=1)  # a call without helpers reaps them too
    assert all(_state(pid) == "gone" for pid in helpers)


def test_a_failed_fork_is_an_error_naming_the_setting_and_leaves_no_helper_or_open_pipe(monkeypatch) -> None:
    real_fork, forks = os.fork, []

    def fork_once() -> int:  # the second fork fails, as with too many processes
        forks.append(1)
        if len(forks) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    open_fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", fork_once)
    with pytest.raises(RuntimeError, match=r"could not start decoding worker processes.*decode.processes: false"):
        map_in_forked_processes(pid_threads_and_square_slowly, [0, 1, 2], workers=3)
    monkeypatch.undo()
    assert len(forks) == 2 and not _live_children()
    assert len(os.listdir("/proc/self/fd")) == open_fds


def test_helpers_work_in_a_process_with_more_than_1024_open_files() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip("this process may not open 1,200 files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    held = []
    try:
        while not held or held[-1] < 1100:  # the helpers' pipes get numbers above 1023
            held.append(os.open(os.devnull, os.O_RDONLY))
        results = map_in_forked_processes(pid_threads_and_square_slowly, [0, 1, 2, 3], workers=2)
        assert [int(t) for _, _, t in results] == [0, 1, 4, 9] and len({pid for pid, _, _ in results}) == 2
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_error_in_a_helper_comes_back_with_its_traceback_and_the_caller_takes_no_further_item() -> None:
    caller, ran_here = os.getpid(), []

    def fn(i: int) -> int:
        if not _in_caller(caller):
            raise ValueError(f"batch {i} is bad")
        ran_here.append(i)
        time.sleep(0.3)
        return i

    with pytest.raises(ValueError, match="batch .* is bad") as info:
        map_in_forked_processes(fn, list(range(10)), workers=2)
    assert "raised in a decoding worker process" in "".join(getattr(info.value, "__notes__", [])) + str(info.value.__cause__)
    assert len(ran_here) < 9  # the caller stopped after its item at the time, not after every remaining one
    assert not _live_children()


def test_an_error_in_one_helper_is_raised_without_waiting_for_another_helpers_batch() -> None:
    caller = os.getpid()

    def fn(i: int) -> int:
        # three slow items for three workers: each takes one. The first helper forked is the slow one: it is the one
        # the caller would wait on first if it waited on helpers in order
        if _in_caller(caller):
            time.sleep(0.3)
        elif _helper_number() == 0:
            time.sleep(5)
        else:
            time.sleep(0.5)
            raise ValueError("the second helper's batch is bad")
        return i

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="the second helper's batch is bad"):
        map_in_forked_processes(fn, [0, 1, 2], workers=3)
    assert time.perf_counter() - t0 < 4  # not after the first helper's 5 s
    assert not _live_children()


def _helper_number() -> int:
    """In a helper: 0 for the first one forked, 1 for the second, ... (read from the caller's frame, which the fork
    copied while the caller was appending helpers to its list)."""
    frame = sys._getframe()
    while frame.f_code.co_name != "map_in_forked_processes":
        frame = frame.f_back  # type: ignore[assignment]
    return len(frame.f_locals["helpers"])


def test_an_error_in_the_callers_own_item_stops_the_helpers_at_once() -> None:
    caller = os.getpid()

    def fn(i: int) -> int:
        if not _in_caller(caller):
            time.sleep(60)
        raise ValueError("the caller's batch is bad")

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="the caller's batch is bad"):
        map_in_forked_processes(fn, list(range(6)), workers=3)
    assert time.perf_counter() - t0 < 20  # not 60 s for each helper's batch
    assert not _live_children()


class NeedsTwoArguments(Exception):
    def __init__(self, what: str, where: int) -> None:
        super().__init__(f"{what} at {where}")  # pickles, but cannot be rebuilt from its args


def test_an_error_that_cannot_cross_the_process_boundary_is_named_not_mistaken_for_a_dead_worker() -> None:
    def fail(i: int) -> int:
        raise NeedsTwoArguments("odd failure", i)

    with pytest.raises(RuntimeError, match="NeedsTwoArguments: odd failure at") as info:
        map_in_forked_processes(only_in_a_helper(fail), list(range(4)), workers=2)
    assert "died" not in str(info.value)


def test_a_helper_killed_mid_batch_is_an_error_naming_the_settings_not_a_hang() -> None:
    caller = os.getpid()

    def fn(i: int) -> int:
        if not _in_caller(caller):
            os.kill(os.getpid(), signal.SIGKILL)  # what the OS's out-of-memory killer does
        time.sleep(0.3)
        return i

    with pytest.raises(RuntimeError, match=r"decoding worker process died.*decode.workers: 1.*decode.processes: false"):
        map_in_forked_processes(fn, list(range(4)), workers=2)
    assert not _live_children()


def test_helpers_ignore_ctrl_c_and_sigterm_so_the_caller_decides_when_to_stop() -> None:
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group; the caller decides what they mean
    caller, by_helpers = os.getpid(), []

    def fn(i: int) -> tuple[int, bool]:
        if _in_caller(caller):
            time.sleep(0.3)
            return os.getpid(), False
        os.kill(os.getpid(), signal.SIGTERM if i % 2 else signal.SIGINT)
        return os.getpid(), signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_IGN

    done = map_in_forked_processes(fn, list(range(6)), workers=2)
    by_helpers = [ignoring for pid, ignoring in done if pid != caller]
    assert len(done) == 6 and by_helpers and all(by_helpers)  # the helper took items, signalled itself and went on


def test_ctrl_c_in_the_caller_kills_the_helpers_at_once_and_a_later_call_forks_again() -> None:
    def fn(i: int) -> int:
        time.sleep(60)  # every batch is still running or queued when the caller is interrupted
        return i

    t0 = time.perf_counter()
    ctrl_c = subprocess.Popen(["sh", "-c", f"sleep 1; kill -INT {os.getpid()}"])  # not a thread: the caller stays alone
    with pytest.raises(KeyboardInterrupt):
        map_in_forked_processes(fn, list(range(6)), workers=2)
    ctrl_c.wait()
    assert time.perf_counter() - t0 < 20
    assert not _live_children()
    assert uses_processes(2)  # this process is single-threaded again: decoding forks its helpers
    pids = {pid for pid, _, _ in map_in_forked_processes(pid_threads_and_square_slowly, [0, 1, 2, 3], workers=2)}
    assert len(pids) == 2


def test_the_caller_goes_on_with_its_own_items_while_a_helper_is_busy() -> None:
    caller, ran_here = os.getpid(), []

    def fn(i: int) -> int:
        if _in_caller(caller):
            ran_here.append(i)
            time.sleep(0.05)
        else:
            time.sleep(1.5)
        return i

    assert map_in_forked_processes(fn, list(range(12)), workers=2) == list(range(12))
    assert len(ran_here) >= 8  # not one item, then a wait for the helper's


def test_a_process_forked_by_a_helper_and_holding_its_pipe_neither_delays_the_results_nor_hides_a_death() -> None:
    caller = os.getpid()

    def fn(i: int) -> int:  # a helper's item forks a process that outlives it, holding the helper's pipe open
        if not _in_caller(caller):
            if os.fork() == 0:
                time.sleep(8)
                os._exit(0)
            if i < 0:
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.3)
        return i

    t0 = time.perf_counter()
    assert map_in_forked_processes(fn, [0, 1, 2], workers=2) == [0, 1, 2]
    assert time.perf_counter() - t0 < 4  # the message's length says it is complete, not the pipe's end
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="decoding worker process died"):
        map_in_forked_processes(fn, [-1, -2, -3], workers=2)
    assert time.perf_counter() - t0 < 4  # the helper's exit is seen, though its pipe stays open


def test_sys_exit_in_a_helper_is_raised_in_the_caller_not_reported_as_a_dead_worker() -> None:
    def stop(i: int) -> int:
        sys.exit(f"batch {i} asked to stop")

    with pytest.raises(SystemExit, match="asked to stop"):
        map_in_forked_processes(only_in_a_helper(stop), [0, 1, 2], workers=2)
    assert not _live_children()


class NeedsTwo:
    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b

    def __reduce__(self):  # noqa: ANN204 - pickles, but rebuilding it fails
        return (NeedsTwo, (self.a,))


def test_a_helpers_result_that_cannot_be_rebuilt_is_an_error_naming_the_setting() -> None:
    with pytest.raises(RuntimeError, match=r"could not be rebuilt here \(TypeError.*decode.processes: false"):
        map_in_forked_processes(only_in_a_helper(lambda i: NeedsTwo(i, i)), [0, 1, 2], workers=2)
    assert not _live_children()


def test_output_buffered_before_the_call_is_written_once_and_a_helpers_prints_arrive(tmp_path: Path) -> None:
    # stdout to a file is block-buffered: a helper forked with the caller's unwritten buffer, or exiting without
    # writing its own, would duplicate or lose lines
    script = textwrap.dedent("""
        import os, time
        from nmtkit.forked_map import map_in_forked_processes
        caller = os.getpid()
        def fn(i):
            if os.getpid() == caller:
                time.sleep(0.3)
            else:
                print(f"from a helper {i}")
            return i
        print("before the call")
        map_in_forked_processes(fn, [0, 1, 2], workers=2)
        print("after the call")
    """)
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        subprocess.run([sys.executable, "-c", script], stdout=f, check=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    lines = out.read_text().splitlines()
    assert lines.count("before the call") == 1 and lines.count("after the call") == 1
    assert any(line.startswith("from a helper") for line in lines)


def test_forking_beside_torchs_own_threads_warns_nothing() -> None:
    # Python 3.12+ warns at any fork from a process with OS threads; torch's idle intra-op threads are no risk here
    torch.set_num_threads(2)
    torch.ones(4096, 4096).sum()  # starts torch's intra-op threads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len({pid for pid, _, _ in map_in_forked_processes(pid_threads_and_square_slowly, [0, 1, 2], workers=2)}) == 2
    assert not [w for w in caught if "multi-threaded" in str(w.message)]


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


def test_helpers_die_with_a_caller_killed_by_sigterm(tmp_path: Path) -> None:
    # `timeout 10 nmtkit translate ... | cat` must end: helpers left behind would hold the pipe open for ever
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
    workers = [int(pid) for pid in pids.read_text().split()]  # the caller's and its helper's
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


def test_log_records_from_a_helper_reach_the_callers_handlers_once_each_in_the_helpers_order() -> None:
    logger, seen = _collecting_logger("nmtkit.test_forked_map")
    caller = os.getpid()

    def fn(i: int) -> int:
        logger.debug("not at this level")
        logger.warning("source %d truncated", i)
        if _in_caller(caller):
            time.sleep(0.2)
        else:
            try:
                raise ValueError("why")
            except ValueError:
                logger.exception("batch %d", i)
        return i

    assert map_in_forked_processes(fn, list(range(6)), workers=2) == list(range(6))
    assert sorted(m for m in seen if m.startswith("source")) == [f"source {i} truncated" for i in range(6)]
    from_helper = [m for m in seen if m.startswith("batch")]
    assert from_helper and all("ValueError: why" in m for m in from_helper)  # the traceback, as text
    items = [int(m.split()[1].splitlines()[0]) for m in from_helper]
    assert items == sorted(items)
    for i in items:  # each of the helper's items: its warning, then its error, as the helper logged them
        assert seen.index(f"source {i} truncated") + 1 == seen.index(next(m for m in from_helper if m.startswith(f"batch {i}\n")))


def test_a_broken_log_call_in_a_helper_is_reported_and_the_batch_goes_on_as_in_a_thread(capfd) -> None:
    logger, seen = _collecting_logger("nmtkit.test_forked_map.broken")
    caller = os.getpid()

    def fn(i: int) -> int:
        if _in_caller(caller):
            time.sleep(0.3)
            return i
        logger.warning("batch %d of %d", i)  # one argument short: logging reports it and goes on
        logger.warning("with an unpicklable extra", extra={"lock": threading.Lock()})
        logger.warning("with an extra that pickles but cannot be rebuilt", extra={"why": NeedsTwoArguments("odd", i)})
        return i

    assert map_in_forked_processes(fn, [0, 1, 2], workers=2) == [0, 1, 2]
    assert seen and seen == ["with an unpicklable extra", "with an extra that pickles but cannot be rebuilt"] * (len(seen) // 2)
    assert "--- Logging error ---" in capfd.readouterr().err
