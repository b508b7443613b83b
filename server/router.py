"""Data parallelism: each new request goes to one replica, which then owns it to the end."""

from __future__ import annotations

from shardgate.server.engine import Engine, RequestHandle
from shardgate.server.validation import ValidRequest


class Router:
    """Sends a request to the replica with the most spare KV blocks, ties to the shortest queue.

    Spare blocks are the free blocks less those the replica's queued requests will take for
    their prompts: a burst of requests arriving together spreads across replicas instead of
    all landing on the one that was idle when they were counted.
    """

    def __init__(self, engines: list[Engine]) -> None:
        if not engines:
            raise ValueError("a router needs at least one replica")
        self.engines = engines

    def pick(self) -> Engine:
        return max(self.engines, key=lambda e: (e.scheduler.spare_blocks(), -e.scheduler.num_requests))

    def submit(self, valid: ValidRequest) -> RequestHandle:
        return self.pick().submit(valid)

    def cancel(self, handle: RequestHandle) -> None:
        self.engines[handle.replica].cancel(handle)
