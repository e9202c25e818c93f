"""The search spread over processes: `torchrun --nproc-per-node N $(which tessera) optimize ...`.

torchrun starts N copies of the command with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (several nodes: `--nnodes`, `--node-rank` and `--rdzv-endpoint`, docs/optimize.md);
`Ranks.from_environment` joins that process group as the runtime's tensor-parallel ranks do (`parallel.join_group`:
gloo on CPU, NCCL on GPUs, each rank on GPU LOCAL_RANK). The work that is independent is
shared out by a fixed rule (`share`: every rank-th item), so each item is done by exactly one rank, with the seed
it gets in one process: the BLD of each (layer, variant), and replace-1-block scoring. What must be measured in
one place stays on rank 0 (`on_main`): the cost model, whose blocks are timed against each other, and everything
after the library (the MIP, measuring children, GKD, fusion, the report). Without torchrun it is one rank and
every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from tessera.runtime.parallel import TensorParallel, backend_for, join_group, torchrun_local, torchrun_world

T = TypeVar("T")
TIMEOUT = datetime.timedelta(hours=6)  # a rank may wait this long for another's BLD share


@dataclass(frozen=True)
class Ranks:
    """This process's place among the search's ranks."""

    tp: TensorParallel | None = None  # the process group's placement (parallel.join_group); None: one process

    @classmethod
    def from_environment(cls, device: torch.device) -> Ranks:
        """torchrun's process group when it started several ranks (`parallel.join_group` through its environment,
        with `device`'s backend: NCCL for CUDA, gloo on CPU), else one rank."""
        rank, size = torchrun_world()
        if size <= 1:
            return cls()
        if dist.is_initialized():  # joined already (a caller that set the group up itself)
            return cls(TensorParallel(dist.get_rank(), dist.get_world_size(), local_rank=torchrun_local()[0]))
        return cls(join_group(rank, size, None, backend_for(device), TIMEOUT.total_seconds()))

    @property
    def rank(self) -> int:
        return 0 if self.tp is None else self.tp.rank

    @property
    def size(self) -> int:
        return 1 if self.tp is None else self.tp.size

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU (LOCAL_RANK) when the search runs on CUDA over several ranks."""
        return device if self.tp is None else self.tp.device(device)

    def share(self, items: list[T]) -> list[T]:
        """This rank's items: every `size`-th from its own index."""
        return items[self.rank :: self.size]

    def gather(self, value: T) -> list[T]:
        """Every rank's value, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        out: list = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0, its result (or the error it raised, raised again) on every rank."""
        if self.size == 1:
            return fn()
        box: list = [None]
        if self.main:
            try:
                with every_core():
                    box[0] = (True, fn())
            except Exception as e:  # every rank must hear of it, or the others wait for ever
                box[0] = (False, e)
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def leave(self) -> None:
        """Every rank done with the collectives, the group torn down: rank 0 goes on alone."""
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            torch.set_num_threads(os.cpu_count() or 1)  # alone now: every core, as on_main has them


@contextlib.contextmanager
def every_core():
    """Rank 0's work alone (the other ranks wait in a collective) on every core of the machine: join_group shared
    them out among the ranks for BLD, and timings must be taken with the threads a child is served with."""
    shared = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(shared)


ONE = Ranks()  # one process: the default everywhere
