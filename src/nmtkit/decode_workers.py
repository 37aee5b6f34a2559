"""How a decode call's sentences become batches, and several batches decoded at once, one per CPU core.

Batches hold sentences of similar length (`length_sorted_batches`): a batch decodes until its longest output ends, so
mixing lengths makes every short sentence wait, and pads every source to the longest one.

A decoding step is about a hundred small ops. Spread over the cores by torch's intra-op threads, each op pays a
fork/join for little work; given a batch of its own, each core runs its ops back to back. So on CPUs the batches of a
`translate` or `evaluate` call go to worker threads that each decode whole batches with one intra-op thread (torch
releases the GIL inside every op, so the workers run in parallel). On 2 cores this measured 435 against 333
sentences/s (docs/performance.md), with identical outputs. GPUs keep one worker: their kernels are already parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

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


def decode_in_input_order(fn: Callable[[list[int]], list[Result]], texts: Sequence[str], size: int, workers: int) -> list[Result]:
    """`fn` (a batch of indices into `texts` -> one result per index) over length-sorted batches of `size`, by
    `workers` threads; the results come back in the order of `texts`."""
    batches = length_sorted_batches(texts, size)
    out: list[Result] = [None] * len(texts)  # type: ignore[list-item]  # every slot is filled below
    for idx, results in zip(batches, map_batches(fn, batches, workers)):
        for i, result in zip(idx, results, strict=True):
            out[i] = result
    return out


def map_batches(fn: Callable[[Item], Result], batches: Sequence[Item], workers: int) -> list[Result]:
    """[fn(b) for b in batches], in order, by up to `workers` threads that share the intra-op threads between them.

    `fn` must enter its own autocast/no_grad contexts: both are per thread in torch.
    """
    workers = min(workers, len(batches))
    if workers <= 1:
        return [fn(b) for b in batches]
    with _THREAD_COUNT:  # a second caller waits rather than restoring a count the first one lowered
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="nmtkit-decode") as pool:
                return list(pool.map(fn, batches))
        finally:
            torch.set_num_threads(threads)
