"""The engine loop: schedule a step, run it on the replica, hand each request its tokens.

It runs as one asyncio task in the gateway's event loop. gRPC handlers submit requests and read
their events from a per-request queue; everything that touches the scheduler happens on the
loop's thread, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import grpc
from tokenizers import Tokenizer

from shardgate.server.config import TelemetryConfig
from shardgate.server.detokenizer import IncrementalDetokenizer, StopMatcher
from shardgate.server.replica import ReplicaClient
from shardgate.server.request import FinishReason, Request, Status
from shardgate.server.scheduler import Scheduler
from shardgate.server.telemetry import ReplicaTelemetry, Telemetry
from shardgate.server.validation import ValidRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """One new token and the text it made visible (maybe empty)."""

    token_id: int
    logprob: float | None
    text: str


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a request that ended normally."""

    reason: FinishReason
    text: str
    """Text held back until the end (an incomplete character, a possible stop-string start)."""


@dataclass(frozen=True)
class ErrorEvent:
    """The last event of a request the server could not finish."""

    code: grpc.StatusCode
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass(eq=False)
class RequestHandle:
    """A submitted request and what its caller reads."""

    request: Request
    replica: int
    """Index of the replica (engine) that serves the request."""
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    @property
    def done(self) -> bool:
        return self.request.status is Status.FINISHED


class Engine:
    """Drives one replica: its own scheduler, KV accounting and step loop."""

    def __init__(
        self,
        index: int,
        scheduler: Scheduler,
        replica: ReplicaClient,
        tokenizer: Tokenizer,
        eos_token_ids: tuple[int, ...],
        telemetry: ReplicaTelemetry | None = None,
    ) -> None:
        self.index = index
        self.scheduler = scheduler
        self.replica = replica
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        # Default: cost accounting and metrics of its own, no tracing, one device.
        self.telemetry = telemetry if telemetry is not None else Telemetry(TelemetryConfig()).replica(index, 1)
        self._handles: dict[int, RequestHandle] = {}
        self._seq_ids = itertools.count(1)
        self._wakeup = asyncio.Event()

    def submit(self, valid: ValidRequest) -> RequestHandle:
        request = Request(next(self._seq_ids), valid.request_id, valid.prompt_ids, valid.params)
        handle = RequestHandle(request, self.index, IncrementalDetokenizer(self.tokenizer, valid.prompt_ids), StopMatcher(valid.stop))
        self._handles[request.seq_id] = handle
        self.scheduler.add(request)
        self._wakeup.set()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Ends a request its caller gave up on; its KV blocks are free before the next step."""
        if not handle.done:
            self._finish(handle, FinishReason.CANCELLED)

    async def run(self) -> None:
        while True:
            if not self.scheduler.has_work():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            plan = self.scheduler.schedule()
            step = self.telemetry.step_started(plan)
            try:
                response = await self.replica.step(plan, metadata=step.metadata, report_timings=step.report_timings)
            except grpc.aio.AioRpcError as error:
                log.error("step %d failed on the replica: %s", plan.step_id, error.details())
                self.telemetry.step_failed(step, error.details() or error.code().name)
                self._fail_all(grpc.StatusCode.UNAVAILABLE, "the model replica failed")
                continue
            self.telemetry.step_finished(step, response)
            sampled = {token.seq_id: (token.token_id, token.logprob) for token in response.tokens}
            for request in self.scheduler.update(plan, sampled):
                self._on_token(self._handles[request.seq_id])

    def _on_token(self, handle: RequestHandle) -> None:
        request = handle.request
        token_id = request.output_ids[-1]
        logprob = request.output_logprobs[-1] if request.params.logprobs else None
        handle.events.put_nowait(TokenEvent(token_id, logprob, handle.stop.feed(handle.detokenizer.push(token_id))))
        if handle.stop.stopped:
            self._finish(handle, FinishReason.STOP)
        elif token_id in self.eos_token_ids and not request.params.ignore_eos:
            self._finish(handle, FinishReason.EOS)
        elif len(request.output_ids) >= request.params.max_new_tokens:
            self._finish(handle, FinishReason.LENGTH)

    def _finish(self, handle: RequestHandle, reason: FinishReason) -> None:
        self.scheduler.finish(handle.request, reason)
        del self._handles[handle.request.seq_id]
        tail = "" if handle.stop.stopped else handle.stop.feed(handle.detokenizer.flush())
        if not handle.stop.stopped:
            tail += handle.stop.flush()
        handle.events.put_nowait(FinishEvent(reason, tail))

    def _fail_all(self, code: grpc.StatusCode, message: str) -> None:
        for handle in list(self._handles.values()):
            self.scheduler.finish(handle.request, FinishReason.ERROR)
            del self._handles[handle.request.seq_id]
            handle.events.put_nowait(ErrorEvent(code, message))

    @property
    def num_active(self) -> int:
        return len(self._handles)


def usage_times(request: Request) -> tuple[float, float]:
    """(queue time, time to first token) in seconds, 0 where the moment has not come."""
    queue = (request.first_scheduled - request.arrival) if request.first_scheduled else 0.0
    ttft = (request.first_token - request.arrival) if request.first_token else 0.0
    return queue, ttft
