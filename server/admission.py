"""Admission control: a request over a queue or concurrency bound is refused at once.

The check runs synchronously in the engine API, before the request is queued, with no await
between the check and the enqueue, so the bounds hold exactly. The caller gets
RESOURCE_EXHAUSTED naming the bound (its message starts with the bound's name, like a
field error) rather than waiting in an unbounded queue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc

from shardgate.server.config import AdmissionConfig
from shardgate.server.validation import RequestError


@dataclass(frozen=True)
class QueueLoad:
    """What waits to run, over every replica and the embedding batcher."""

    requests: int
    tokens: int


class Ticket:
    """An admitted request's place in the concurrency count; release() it when the request ends."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.active -= 1


class Admission:
    def __init__(self, config: AdmissionConfig, queue_load: Callable[[], QueueLoad]) -> None:
        self.config = config
        self._queue_load = queue_load
        self.active = 0
        """Admitted requests not yet ended."""

    def admit(self, num_tokens: int) -> Ticket:
        """Counts a request of num_tokens tokens in, or raises RequestError(RESOURCE_EXHAUSTED)."""
        config = self.config
        if self.active >= config.max_concurrent_requests:
            raise _exhausted("max_concurrent_requests", f"{self.active} requests in progress: the bound", config.max_concurrent_requests)
        load = self._queue_load()
        if load.requests >= config.max_queue_requests:
            raise _exhausted("max_queue_requests", f"{load.requests} requests queued: the bound", config.max_queue_requests)
        if load.tokens + num_tokens > config.max_queue_tokens:
            message = f"{load.tokens} queued tokens + {num_tokens} of this request exceed the bound"
            raise _exhausted("max_queue_tokens", message, config.max_queue_tokens)
        self.active += 1
        return Ticket(self)


def _exhausted(bound: str, message: str, limit: int) -> RequestError:
    flag = "--" + bound.replace("_", "-")
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, bound, f"{message} ({flag} {limit}); retry later")
