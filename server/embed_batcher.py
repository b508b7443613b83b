"""Dynamic batching of Embed calls, the way Triton's dynamic batcher forms batches.

Calls wait in one queue, ordered like generation requests (priority with aging,
server/priority.py). The *candidate batch* is the longest run of calls from the head of the
queue whose inputs fit `max_batch_size` (a call's inputs are never split between batches). An
engine that is free to run an embedding forward takes the candidate when it is ready:

1. full: it holds max_batch_size inputs, or the next call does not fit beside it;
2. else, a preferred size: the longest prefix of it whose input count is a preferred batch size
   is taken at once;
3. else, once the oldest call in it has waited `max_queue_delay_us`, all of it.

Batches form when an engine can run them, so calls that arrive while a forward runs join the
next batch. Several engines (replicas) may take from one batcher.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from shardgate.server.config import EmbedBatcherConfig
from shardgate.server.priority import virtual_arrival


class Pooling(enum.Enum):
    MEAN = "mean"
    LAST = "last"


_job_ids = itertools.count(1)


@dataclass(eq=False)
class EmbedJob:
    """One Embed call: its inputs' token ids and, as batches compute them, their vectors."""

    request_id: str
    inputs: list[list[int]]
    """Token ids of each input."""
    pooling: Pooling
    normalize: bool
    priority: int = 0
    deadline: float | None = None
    """time.monotonic() by which the call must end, or None."""
    arrival: float = field(default_factory=time.monotonic)
    job_id: int = field(default_factory=lambda: next(_job_ids))
    vectors: list[bytes | None] = field(init=False)
    """Each input's vector as little-endian float32 bytes, once computed."""
    first_scheduled: float | None = None
    error: tuple[grpc.StatusCode, str] | None = None
    """Why the call ended without vectors, if it did."""
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)

    @property
    def num_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.inputs)

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    def pending_inputs(self) -> list[int]:
        """Indices of the inputs whose vector is not computed yet."""
        return [i for i, vector in enumerate(self.vectors) if vector is None]

    def set_vector(self, index: int, vector: bytes) -> None:
        self.vectors[index] = vector
        if not self.done and all(v is not None for v in self.vectors):
            self.finished.set()

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """Ends the call with an error status (no effect once it has ended)."""
        if not self.done:
            self.error = (code, message)
            self.finished.set()


class DynamicBatcher:
    def __init__(self, config: EmbedBatcherConfig, aging_s: float) -> None:
        self.config = config
        self.aging_s = aging_s
        self._queue: list[EmbedJob] = []
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        """callback() runs whenever a call is queued (engines use it to wake up)."""
        self._listeners.append(callback)

    @property
    def num_queued_requests(self) -> int:
        return len(self._queue)

    @property
    def num_queued_tokens(self) -> int:
        return sum(job.num_tokens for job in self._queue)

    def submit(self, job: EmbedJob) -> None:
        bisect.insort(self._queue, job, key=self._queue_key)
        for callback in self._listeners:
            callback()

    def cancel(self, job: EmbedJob) -> None:
        """Ends a call its caller gave up on, wherever it is; an engine skips ended calls."""
        if job in self._queue:
            self._queue.remove(job)
        job.fail(grpc.StatusCode.CANCELLED, "cancelled")

    def take(self, now: float) -> list[EmbedJob]:
        """The next batch if it is ready (see the module docstring), else []. Calls past their
        deadline are ended with DEADLINE_EXCEEDED first, and never run."""
        self._drop_expired(now)
        candidate, full = self._candidate()
        if not candidate:
            return []
        if not full:
            taken = 0
            for count, size in enumerate(itertools.accumulate(len(job.inputs) for job in candidate), 1):
                if size in self.config.preferred_batch_sizes:
                    taken = count
            if taken:
                candidate = candidate[:taken]
            elif now < self._ready_at(candidate):
                return []
        del self._queue[: len(candidate)]
        return candidate

    def seconds_until_ready(self, now: float) -> float | None:
        """How long until take() has something to do (a batch ready by the delay rule, or a call
        to drop at its deadline); None when nothing waits."""
        candidate, _ = self._candidate()
        if not candidate:
            return None
        deadlines = [job.deadline for job in self._queue if job.deadline is not None]
        return max(0.0, min([self._ready_at(candidate), *deadlines]) - now)

    def _candidate(self) -> tuple[list[EmbedJob], bool]:
        """The head of the queue that fits one batch, and whether it is full."""
        size = 0
        for count, job in enumerate(self._queue):
            if size + len(job.inputs) > self.config.max_batch_size:
                return self._queue[:count], True
            size += len(job.inputs)
        return list(self._queue), size == self.config.max_batch_size

    def _ready_at(self, candidate: list[EmbedJob]) -> float:
        return min(job.arrival for job in candidate) + self.config.max_queue_delay_us / 1e6

    def _drop_expired(self, now: float) -> None:
        for job in [job for job in self._queue if job.deadline is not None and job.deadline <= now]:
            self._queue.remove(job)
            job.fail(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded while queued (waited {now - job.arrival:.3f} s)")

    def _queue_key(self, job: EmbedJob) -> tuple[float, int]:
        return virtual_arrival(job.priority, job.arrival, self.aging_s), job.job_id
