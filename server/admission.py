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
    """An admitted request's place in the concurrency count (and its tenant's); release() it
    when the request ends."""

    def __init__(self, admission: Admission, tenant: str | None) -> None:
        self._admission = admission
        self._tenant = tenant
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.active -= 1
            if self._tenant is not None:
                self._admission.release_tenant(self._tenant)


class Admission:
    def __init__(self, config: AdmissionConfig, queue_load: Callable[[], QueueLoad]) -> None:
        self.config = config
        self._queue_load = queue_load
        self.active = 0
        """Admitted requests not yet ended."""
        self.active_by_tenant: dict[str, int] = {}
        """Of those, each tenant's (API key's, by its opaque id; only tenants with some)."""

    def admit(self, num_tokens: int, tenant: str | None = None) -> Ticket:
        """Counts a request of num_tokens tokens (of `tenant`, None without API keys) in, or
        raises RequestError(RESOURCE_EXHAUSTED) naming the bound or quota, never the key."""
        config = self.config
        if self.active >= config.max_concurrent_requests:
            raise _exhausted("max_concurrent_requests", f"{self.active} requests in progress: the bound", config.max_concurrent_requests)
        quota = config.max_concurrent_requests_per_key
        if tenant is not None and quota and self.active_by_tenant.get(tenant, 0) >= quota:
            raise _exhausted("max_concurrent_requests_per_key", f"{quota} requests of this API key in progress: its quota", quota)
        load = self._queue_load()
        if load.requests >= config.max_queue_requests:
            raise _exhausted("max_queue_requests", f"{load.requests} requests queued: the bound", config.max_queue_requests)
        if load.tokens + num_tokens > config.max_queue_tokens:
            message = f"{load.tokens} queued tokens + {num_tokens} of this request exceed the bound"
            raise _exhausted("max_queue_tokens", message, config.max_queue_tokens)
        self.active += 1
        if tenant is not None:
            self.active_by_tenant[tenant] = self.active_by_tenant.get(tenant, 0) + 1
        return Ticket(self, tenant)

    def release_tenant(self, tenant: str) -> None:
        left = self.active_by_tenant[tenant] - 1
        if left:
            self.active_by_tenant[tenant] = left
        else:
            del self.active_by_tenant[tenant]


def _exhausted(bound: str, message: str, limit: int) -> RequestError:
    flag = "--" + bound.replace("_", "-")
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, bound, f"{message} ({flag} {limit}); retry later")
