"""Several processes through torchrun: one per GPU (or CPU process with gloo), data-parallel.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process and every
helper here is a no-op, so the training loop reads the same either way.
"""

from __future__ import annotations

import gc
import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Host-side flags (stop decisions) travel through gloo: with NCCL a flag would be a device tensor, and reading
    # it back (`.item()`) would make the host wait for every kernel queued before it. None: the default group.
    host_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (in place), or return it as is in a single process."""
        if self.is_distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True: keeps stop decisions identical everywhere.
        A host-to-host exchange of one integer (CPU tensor, gloo): the device's queue is never waited for."""
        if not self.is_distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` in rank order, on every rank, or [obj] in one process. `obj` travels through the host
        group as `torch.save` bytes and comes back through `torch.load(weights_only=True)`: tensors and plain values
        only (all_gather_object's own pickling of tensors fails to load them back in torch 2.13)."""
        if not self.is_distributed:
            return [obj]
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, buffer.getvalue(), group=self.host_group)
        return [torch.load(io.BytesIO(b), weights_only=True) for b in out]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def init_distributed(device_type: str) -> Dist:
    """Join the process group that torchrun describes (nccl on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend=backend)
    if dist.get_backend() != "gloo":  # every rank creates the group, in the same order
        d.host_group = dist.new_group(backend="gloo")
    return d


def describe(d: Dist) -> str:
    """'rank R of N (local rank L, backend)' for the log."""
    return f"rank {d.rank} of {d.world_size} (local rank {d.local_rank}, {dist.get_backend()})"


def shutdown_distributed() -> None:
    if dist.is_initialized():
        # DistributedDataParallel holds reference cycles (its hooks point back at it), so it may be freed by a
        # later garbage collection, even during interpreter shutdown, after the group below is gone; its C++
        # reducer then aborts the process (a rare SIGABRT of a rank after a finished run). Collect it now.
        gc.collect()
        dist.destroy_process_group()
