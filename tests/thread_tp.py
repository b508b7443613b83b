"""Tensor-parallel ranks as threads of one process: real sharded layers, and collectives that
exchange tensors through shared memory, so TP logic is tested without processes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from shardgate.shards.parallel import TensorParallel


class _World:
    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * size

    def exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read them
        return parts


class ThreadTP(TensorParallel):
    def __init__(self, rank: int, world: _World) -> None:
        super().__init__(rank, len(world.slots), group=world)
        self.world = world

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x.copy_(sum(self.world.exchange(self.rank, x)))

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.world.exchange(self.rank, x), dim=-1)


def run_ranks(size: int, fn: Callable[[ThreadTP], object]) -> list:
    """fn(tp) on every rank at once; the ranks' results in rank order."""
    world = _World(size)
    with ThreadPoolExecutor(size) as pool:
        return [f.result() for f in [pool.submit(fn, ThreadTP(rank, world)) for rank in range(size)]]
