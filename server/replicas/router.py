"""Data parallelism: each new request goes to one replica, which runs it until it ends or that
replica fails (or is preempted): then the router moves it to another, where it continues."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from shardgate.server.delivery import OutputStream
from shardgate.server.engine import FAILURE, Engine, RequestHandle
from shardgate.server.output_processor import ErrorEvent
from shardgate.server.request import FinishReason
from shardgate.server.validation import RequestError, ValidRequest

log = logging.getLogger(__name__)
NO_REPLICA = "no model replica can serve right now (failed replicas are restarting)"


class Router:
    """Sends a request to the replica with the most spare KV blocks, ties to the shortest queue.

    Spare blocks are the free blocks less those the replicas' queued requests will take for
    their prompts: a burst of requests arriving together spreads across replicas instead of
    all landing on the one that was idle when they were counted.

    When a replica fails or its driver stops, its generations move (adopt) to the healthy
    replica picked the same way, with the tokens they generated, and continue there. With
    `resume_on_restart`, when no replica is healthy they wait (parked, within their deadlines)
    for one to come back from its restart instead of ending UNAVAILABLE.
    """

    def __init__(self, engines: list[Engine], max_request_retries: int = 1, resume_on_restart: bool = False) -> None:
        if not engines:
            raise ValueError("a router needs at least one replica")
        self.engines = engines
        self.max_request_retries = max_request_retries
        """Times a request running on a replica that fails moves to another before it ends UNAVAILABLE."""
        self.resume_on_restart = resume_on_restart
        self._parked: dict[RequestHandle, tuple[str, asyncio.TimerHandle | None]] = {}
        """Generations waiting for a replica to come back: why they moved, and their deadline's timer."""
        for engine in engines:
            engine.on_orphans = self.adopt
            engine.on_state_change = self._unpark

    @property
    def serving(self) -> bool:
        return any(engine.healthy for engine in self.engines)

    @property
    def _all_abandoned(self) -> bool:
        return all(engine.abandoned for engine in self.engines)

    @property
    def num_parked(self) -> int:
        return len(self._parked)

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

    def adopt(self, orphans: list[RequestHandle], cause: str = FAILURE) -> None:
        """Moves the generations of a failed (or stopping) replica onto healthy ones. One that was
        running on a replica that failed (not merely queued there, and not handed over by a
        stopping driver) spends a retry: past max_request_retries (a request that itself brings
        replicas down would take them all, one after another) it ends UNAVAILABLE."""
        for handle in orphans:
            if handle.was_running and cause == FAILURE:
                if handle.retries >= self.max_request_retries:
                    log.warning("request %s ends UNAVAILABLE after %d retries", handle.request.request_id, handle.retries)
                    handle.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, self._retries_spent(handle)))
                    continue
                handle.retries += 1
            self._place(handle, cause)

    def _place(self, handle: RequestHandle, cause: str) -> None:
        engine = self.pick()
        if engine is not None:
            engine.adopt(handle, cause)
        elif self.resume_on_restart and not self._all_abandoned:
            self._park(handle, cause)
        else:
            handle.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, NO_REPLICA))

    def _park(self, handle: RequestHandle, cause: str) -> None:
        """Keeps a generation until a replica serves again (--resume-on-restart), or its deadline."""
        deadline = handle.request.deadline
        timer = None
        if deadline is not None:
            timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), self._expire, handle)
        self._parked[handle] = (cause, timer)
        log.info("request %s waits for a replica to restart (--resume-on-restart)", handle.request.request_id)

    def _unpark(self) -> None:
        """A replica came back (or one stays down for good): the parked generations move to the
        healthy replicas, or end UNAVAILABLE when every replica stays down."""
        for handle in list(self._parked):
            engine = self.pick()
            if engine is None and not self._all_abandoned:
                return
            cause, timer = self._parked.pop(handle)
            if timer is not None:
                timer.cancel()
            if engine is None:
                handle.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, "no model replica is left to serve this request"))
            else:
                engine.adopt(handle, cause)

    def _expire(self, handle: RequestHandle) -> None:
        if self._parked.pop(handle, None) is not None:
            message = f"deadline exceeded while waiting for a replica to restart, after {len(handle.request.output_ids)} generated tokens"
            handle.put(ErrorEvent(grpc.StatusCode.DEADLINE_EXCEEDED, message))

    def _retries_spent(self, handle: RequestHandle) -> str:
        return f"the model replicas running this request failed {handle.retries + 1} times"

    def cancel(self, handle: RequestHandle) -> None:
        parked = self._parked.pop(handle, None)
        if parked is None:
            self.engines[handle.replica].cancel(handle)
            return
        _, timer = parked
        if timer is not None:
            timer.cancel()
        handle.request.finish_reason = FinishReason.CANCELLED
        handle.put(handle.output.finish(FinishReason.CANCELLED))

    def cancel_all(self) -> None:
        """Ends every generation, running, queued or parked, with finish reason `cancelled`."""
        for engine in self.engines:
            engine.cancel_all()
        for handle in list(self._parked):
            self.cancel(handle)
