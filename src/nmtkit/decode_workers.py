"""Decoding several batches at once, one per CPU core.

A decoding step is about a hundred small ops. Spread over the cores by torch's intra-op threads, each op pays a
fork/join for little work; given a batch of its own, each core runs its ops back to back. So on CPUs the batches of a
`translate` or `evaluate` call go to worker threads that each decode whole batches with one intra-op thread (torch
releases the GIL inside every op, so the workers run in parallel). On 2 cores this measured 435 against 333
sentences/s (docs/performance.md), with identical outputs. GPUs keep one worker: their kernels are already parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def resolve_workers(requested: int, device: torch.device) -> int:
    """decode.workers as configured (0 = auto) -> the number of workers: one per intra-op thread on CPU, 1 on GPUs."""
    if device.type != "cpu":
        return 1
    return requested if requested > 0 else torch.get_num_threads()


def map_batches(fn: Callable[[Item], Result], batches: Sequence[Item], workers: int) -> list[Result]:
    """[fn(b) for b in batches], in order, by up to `workers` threads that share the intra-op threads between them.

    `fn` must enter its own autocast/no_grad contexts: both are per thread in torch.
    """
    workers = min(workers, len(batches))
    if workers <= 1:
        return [fn(b) for b in batches]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="nmtkit-decode") as pool:
            return list(pool.map(fn, batches))
    finally:
        torch.set_num_threads(threads)
