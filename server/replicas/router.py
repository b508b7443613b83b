"""Data parallelism: each new request goes to one replica, which then owns it to the end."""

from __future__ import annotations

import logging

import grpc

from shardgate.server.delivery import OutputStream
from shardgate.server.engine import Engine, RequestHandle
from shardgate.server.output_processor import ErrorEvent
from shardgate.server.validation import RequestError, ValidRequest

log = logging.getLogger(__name__)
NO_REPLICA = "no model replica can serve right now (failed replicas are restarting)"


class Router:
    """Sends a request to the replica with the most spare KV blocks, ties to the shortest queue.

    Spare blocks are the free blocks less those the replica's queued requests will take for
    their prompts: a burst of requests arriving together spreads across replicas instead of
    all landing on the one that was idle when they were counted.
    """

    def __init__(self, engines: list[Engine], max_request_retries: int = 1) -> None:
        if not engines:
            raise ValueError("a router needs at least one replica")
        self.engines = engines
        self.max_request_retries = max_request_retries
        """Times a request running on a replica that fails moves to another before it ends UNAVAILABLE."""
        for engine in engines:
            engine.on_orphans = self.adopt

    @property
    def serving(self) -> bool:
        return any(engine.healthy for engine in self.engines)

    def pick(self) -> Engine | None:
        healthy = [engine for engine in self.engines if engine.healthy]
        return max(healthy, key=lambda e: (e.scheduler.spare_blocks(), -e.scheduler.num_requests), default=None)

    def submit(
        self, valid: ValidRequest, deadline: float | None = None, stream: OutputStream | None = None, cache_salt: bytes = b""
    ) -> RequestHandle:
        engine = self.pick()
        if engine is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "replicas", NO_REPLICA)
        return engine.submit(valid, deadline, stream, cache_salt)

    def adopt(self, orphans: list[RequestHandle]) -> None:
        """Moves requests that had sent nothing off a failed replica, onto healthy ones. One that
        was running there (not merely queued) counts a retry: past max_request_retries (a request
        that itself brings replicas down would take them all, one after another) it ends UNAVAILABLE."""
        for handle in orphans:
            if handle.request.first_scheduled is not None:
                if handle.retries >= self.max_request_retries:
                    log.warning("request %s ends UNAVAILABLE after %d retries", handle.request.request_id, handle.retries)
                    handle.events.put_nowait(ErrorEvent(grpc.StatusCode.UNAVAILABLE, self._retries_spent(handle)))
                    continue
                handle.retries += 1
            engine = self.pick()
            if engine is None:
                handle.events.put_nowait(ErrorEvent(grpc.StatusCode.UNAVAILABLE, NO_REPLICA))
            else:
                engine.adopt(handle)

    def _retries_spent(self, handle: RequestHandle) -> str:
        return f"the model replicas running this request failed {handle.retries + 1} times"

    def cancel(self, handle: RequestHandle) -> None:
        self.engines[handle.replica].cancel(handle)
