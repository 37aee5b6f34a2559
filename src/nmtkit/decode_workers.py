"""How a decode call's sentences become batches, and several batches decoded at once, one per CPU core.

Batches hold sentences of similar length (`length_sorted_batches`): a batch decodes until its longest output ends, so
mixing lengths makes every short sentence wait, and pads every source to the longest one.

A decoding step is about a hundred small ops. Spread over the cores by torch's intra-op threads, each op pays a
fork/join for little work; given a batch of its own, each core runs its ops back to back. So on CPUs the batches of a
`translate` or `evaluate` call go to workers that each decode whole batches with one intra-op thread. GPUs keep one
worker: their kernels are already parallel.

The workers are the caller and forked helper processes where the OS has `fork` (Linux; `decode.processes`;
forked_map.py), threads elsewhere. Threads share the GIL: torch releases it inside an op, but each op's Python side
(argument parsing, dispatch) holds it, and a step's ops are small enough for that to matter. On 2 cores (bf16, 18 alternating pairs)
processes decoded 7-12% more sentences/s than threads when the machine was busier, as many when it was quiet, never
fewer (docs/performance.md). Each call forks its own helpers (~7 ms each), so they always see the current weights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from .forked_map import fork_available, map_in_forked_processes

Item = TypeVar("Item")
Result = TypeVar("Result")

AUTO_MAX_WORKERS = 8  # each worker holds its own batch's KV cache: `auto` stops here on many-core machines
_THREAD_COUNT = threading.Lock()  # torch's intra-op thread count is process-wide: one map at a time changes it


def resolve_workers(requested: int, device: torch.device) -> int:
    """decode.workers as configured -> the number of workers: 1 on GPUs; on CPU the value asked for, or with 0 one per
    intra-op thread up to AUTO_MAX_WORKERS."""
    if device.type != "cpu":
        return 1
    return requested if requested > 0 else min(torch.get_num_threads(), AUTO_MAX_WORKERS)


def length_sorted_batches(texts: Sequence[str], size: int) -> list[list[int]]:
    """Indices of `texts` in batches of `size`, shortest texts first (characters stand in for pieces); stable, so equal
    lengths keep their order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[start : start + size] for start in range(0, len(order), size)]


def decode_in_input_order(
    fn: Callable[[list[int]], Any],
    texts: Sequence[str],
    size: int,
    workers: int,
    processes: bool = True,
    finish: Callable[[list[int], Any], list[Result]] | None = None,
) -> list[Result]:
    """`fn` (a batch of indices into `texts` -> one result per index, or whatever `finish` takes) over length-sorted
    batches of `size`, by `workers` workers (`map_batches`); `finish(indices, fn's output)` then runs in the caller,
    batch by batch, for work better done here than in a worker. The results come back in the order of `texts`."""
    batches = length_sorted_batches(texts, size)
    out: list[Result] = [None] * len(texts)  # type: ignore[list-item]  # every slot is filled below
    for idx, decoded in zip(batches, map_batches(fn, batches, workers, processes)):
        results = finish(idx, decoded) if finish is not None else decoded
        for i, result in zip(idx, results, strict=True):
            out[i] = result
    return out


def map_batches(fn: Callable[[Item], Result], batches: Sequence[Item], workers: int, processes: bool = True) -> list[Result]:
    """[fn(b) for b in batches], in order, by up to `workers` workers that share the intra-op threads between them:
    the caller and forked helper processes, one intra-op thread each, where `processes`, the OS and the thread count
    allow it; threads otherwise.

    `fn` must enter its own autocast/no_grad contexts: both are per thread in torch. With processes, fn's results
    must be picklable.
    """
    workers = min(workers, len(batches))
    if workers <= 1:
        return [fn(b) for b in batches]
    if uses_processes(workers, processes):
        return map_in_forked_processes(fn, batches, workers)
    return _map_in_threads(fn, batches, workers)


def uses_processes(workers: int, processes: bool = True) -> bool:
    """Whether `map_batches` runs `workers` (> 1) workers as forked processes. Threads instead:
    - with fewer workers than intra-op threads (so also `decode.workers: 0` on more than 8 threads): a forked worker
      must run one thread, since GNU OpenMP's thread pool does not survive a fork;
    - when the caller has other Python threads (a server translating from several threads): one of them could hold
      a lock inside torch at the moment of the fork, and the child would wait for it forever. The `nmtkit` commands
      are single-threaded."""
    return (
        workers > 1 and processes and fork_available() and torch.get_num_threads() <= workers
        and not _other_threads()
    )


def _other_threads() -> list[threading.Thread]:
    """The process's Python threads besides the caller's, leaving out tqdm's progress-bar monitor, which outlives
    its bars (a training run in the same process leaves one) and only sleeps and redraws: a child never uses it."""
    return [t for t in threading.enumerate() if t is not threading.current_thread() and type(t).__name__ != "TMonitor"]


def _map_in_threads(fn: Callable[[Item], Result], batches: Sequence[Item], workers: int) -> list[Result]:
    with _THREAD_COUNT:  # a second caller waits rather than restoring a count the first one lowered
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="nmtkit-decode") as pool:
                return list(pool.map(fn, batches))
        finally:
            torch.set_num_threads(threads)
