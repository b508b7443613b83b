"""Who this rank is in its replica, and the collectives that join the ranks.

Rank layout of a replica with tp_size T and pp_size P: ``rank = pp_stage * T + tp_rank``.

    tp=2, pp=2:          tp_rank 0   tp_rank 1
        pp_stage 0:        rank 0      rank 1     (embedding, layers [0, k))
        pp_stage 1:        rank 2      rank 3     (layers [k, n), norm, LM head, sampling)

Rank 0 is the driver: it alone talks to the gateway and hands each step to the others over a
gloo control group. A world of one creates no process group at all: every collective returns
its input, so the same code runs unchanged in single-process tests.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shardgate.shards.timing import CommTimer


def partition_layers(num_layers: int, pp_size: int) -> list[tuple[int, int]]:
    """Layer ranges [start, end) of each pipeline stage: as even as possible, earlier stages
    taking the remainder (the last stage also runs the LM head and sampling)."""
    if pp_size < 1 or num_layers < pp_size:
        raise ValueError(f"cannot split {num_layers} layers into {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    ranges, start = [], 0
    for stage in range(pp_size):
        end = start + base + (1 if stage < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


class TensorParallel:
    """The ranks that split every layer of one pipeline stage. With size 1 the collectives are
    identities, so a single rank pays nothing."""

    def __init__(self, rank: int = 0, size: int = 1, group: dist.ProcessGroup | None = None) -> None:
        if size < 1 or not 0 <= rank < size or (size > 1 and group is None):
            raise ValueError(f"invalid tensor-parallel rank {rank} of {size}")
        self.rank, self.size, self.group = rank, size, group
        self.timer: CommTimer | None = None
        """Set by the runner for a step whose timings are wanted: the collectives add their time."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place."""
        if self.size > 1:
            started = self.timer.start() if self.timer is not None else None
            dist.all_reduce(x, group=self.group)
            if self.timer is not None:
                self.timer.stop("all_reduce", started)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x concatenated along the last dimension, in rank order."""
        if self.size == 1:
            return x
        started = self.timer.start() if self.timer is not None else None
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        if self.timer is not None:
            self.timer.stop("all_gather", started)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()


@dataclass(frozen=True)
class ParallelConfig:
    """The shape of one replica."""

    tp_size: int = 1
    """Ranks that split each layer (heads, MLP features, vocabulary)."""
    pp_size: int = 1
    """Pipeline stages, each a contiguous range of layers."""

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError("tp and pp sizes must be >= 1")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


@dataclass
class ParallelState:
    """This rank's place in the replica and its process groups."""

    config: ParallelConfig
    rank: int = 0
    tp: TensorParallel = field(default_factory=TensorParallel)
    control: dist.ProcessGroup | None = None
    """gloo group of all ranks: step plans and sampled tokens travel here (CPU tensors)."""

    @property
    def tp_rank(self) -> int:
        return self.rank % self.config.tp_size

    @property
    def pp_stage(self) -> int:
        return self.rank // self.config.tp_size

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.config.pp_size - 1

    @property
    def prev_rank(self) -> int:
        """Same tp_rank in the previous stage (where this stage's input hidden states come from)."""
        return self.rank - self.config.tp_size

    @property
    def next_rank(self) -> int:
        return self.rank + self.config.tp_size

    @property
    def sampler_rank(self) -> int:
        """The rank whose sampled tokens are reported: tp_rank 0 of the last stage."""
        return (self.config.pp_size - 1) * self.config.tp_size

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        return partition_layers(num_layers, self.config.pp_size)[self.pp_stage]


def init_parallel(config: ParallelConfig, rank: int, world_size: int, backend: str, timeout_s: float) -> ParallelState:
    """Joins the replica's process group (torchrun's env:// rendezvous) and makes the sub-groups.

    Every rank must create every group, in the same order, even those it is not in."""
    if world_size != config.world_size:
        raise ValueError(f"WORLD_SIZE is {world_size} but tp × pp is {config.tp_size} × {config.pp_size}")
    if world_size == 1:
        return ParallelState(config)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    tp = SINGLE
    for stage in range(config.pp_size):
        ranks = list(range(stage * config.tp_size, (stage + 1) * config.tp_size))
        group = dist.new_group(ranks) if config.tp_size > 1 else None
        if rank in ranks and group is not None:
            tp = TensorParallel(rank % config.tp_size, config.tp_size, group)
    return ParallelState(config, rank, tp, control)


DEVICE_NAME_BYTES = 32


def gather_device_names(device: torch.device, parallel: ParallelState) -> list[str]:
    """Every rank's device name, in rank order (fixed-size byte tensors: no pickle)."""
    if parallel.config.world_size == 1:
        return [str(device)]
    name = torch.zeros(DEVICE_NAME_BYTES, dtype=torch.uint8)
    encoded = str(device).encode()[:DEVICE_NAME_BYTES]
    name[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    names = [torch.empty_like(name) for _ in range(parallel.config.world_size)]
    dist.all_gather(names, name, group=parallel.control)
    return [bytes(n.tolist()).rstrip(b"\0").decode() for n in names]


def _replica_reduce(value: int, parallel: ParallelState, op: dist.ReduceOp.RedOpType) -> int:
    """value reduced over the replica's ranks (on the control group)."""
    if parallel.config.world_size == 1:
        return value
    reduced = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(reduced, op=op, group=parallel.control)
    return int(reduced.item())


def replica_sum(value: int, parallel: ParallelState) -> int:
    """value summed over the replica's ranks."""
    return _replica_reduce(value, parallel, dist.ReduceOp.SUM)


def agree_on_blocks(num_blocks: int, parallel: ParallelState) -> int:
    """The replica's block count: the smallest any rank can hold (the gateway hands out one set
    of block ids for all of them)."""
    return _replica_reduce(num_blocks, parallel, dist.ReduceOp.MIN)
