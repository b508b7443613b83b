"""The engine loop of one replica: schedule a step, run it on the replica, hand each request's
tokens to its output processor (output_processor.py); between generation steps, run the
embedding batches the batcher forms.

It runs as one asyncio task in the gateway's event loop. The engine API (engine_api.py) submits
requests and reads their events from a per-request queue; everything that touches the scheduler happens on the
loop's thread, so no locks are needed.

Each iteration first ends the requests whose deadline has passed (a queued one never reaches
the replica; a running one keeps the tokens it streamed and frees its blocks before the next
step). Then, when an embedding batch is ready, it runs it, unless the previous forward was an
embedding batch and generation is waiting: the two kinds alternate, so neither starves.

Async scheduling (--async-scheduling, the default): the engine sends step n+1 as soon as step
n is sent, before n answers, so the replica goes from one step to the next without waiting for
the gateway, and each step's tokens reach the streams while the next step runs. Step n+1 decodes
the tokens step n samples without knowing them (the driver feeds them: see scheduler.py); a
request that ends at step n (EOS, stop string, cancellation, deadline) has its token of step
n+1 dropped and its blocks freed before step n+2 is planned. At most two steps are in flight;
an embedding batch or a heartbeat waits until none is. Without it, a step is planned only after
the one before it was applied.

Failures: each call to the replica gets a deadline that follows the measured time of calls of
its shape (step_deadlines.py), counted from when the step before it answered; an idle replica
gets a heartbeat (its driver checks that every rank answers) every --heartbeat-interval. A call
that errs or runs past its deadline, and any exception in an iteration, fails the replica (never
the gateway): the supervisor restarts it. Every generation it was serving then moves
(on_orphans: the router) to another replica, which recomputes its prompt and the tokens it
generated and goes on from there, the request's output processor unchanged: its stream continues
with no repeated or missing token (the tokens of steps still in flight are dropped: a request's
output_ids hold only applied tokens). A replica whose driver says it is stopping (SIGTERM: a spot
node being reclaimed) sends no new step, applies the steps in flight, and hands its generations
over the same way (a preemption: it spends no request's retries).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from tokenizers import Tokenizer

from shardgate.proto import shard_pb2
from shardgate.server.config import SupervisionConfig, TelemetryConfig
from shardgate.server.delivery import OutputStream
from shardgate.server.embed_batcher import DynamicBatcher, EmbedJob
from shardgate.server.output_processor import ErrorEvent, Event, OutputProcessor
from shardgate.server.replicas.client import EmbedItem, ReplicaClient
from shardgate.server.request import FinishReason, Request, Status
from shardgate.server.scheduler import Scheduler, StepPlan
from shardgate.server.step_deadlines import DECODE, EMBED, PREFILL, CallShape, StepDeadlines
from shardgate.server.telemetry import ReplicaTelemetry, StepRecord, Telemetry
from shardgate.server.validation import ValidRequest

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)
FAILURE, PREEMPTION = "failure", "preemption"
"""Why a generation moved: its replica failed, or its driver got SIGTERM and handed it over."""


@dataclass(eq=False)
class RequestHandle:
    """A submitted request and what its caller reads."""

    request: Request
    replica: int
    """Index of the replica (engine) that serves the request."""
    output: OutputProcessor
    stream: OutputStream
    """The caller's stream: while it is over its bound of undelivered output, the request gets no steps."""
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    undelivered: int = 0
    """Events (tokens, the end) handed to the caller's queue and not yet written by its transport
    (counted in the stream's too)."""
    held_since: float | None = None
    """time.monotonic() since when the request is held back for its stream; None while it is not."""
    on_stall_end: Callable[[], None] | None = None
    """Called when the request ends for a stalled reader: its admission may go, though its last
    messages wait for a reader (bounded by the stream's bound)."""

    def put(self, event: Event) -> None:
        """Queues an event for the caller; it counts as undelivered until delivered() says it was written."""
        self.events.put_nowait(event)
        self.undelivered += 1
        self.stream.made(1)

    def delivered(self, count: int) -> None:
        self.undelivered -= count
        self.stream.delivered(count)

    retries: int = 0
    """Times it moved to another replica after the one running it failed (preemptions apart)."""
    was_running: bool = False
    """It was running (not merely queued) on the replica it last moved off: a failure there
    spends one of its retries."""
    span: Span | None = None
    """The request's span (set by the engine API), which gets an event per resume."""

    @property
    def done(self) -> bool:
        return self.request.status is Status.FINISHED


@dataclass(eq=False)
class StepInFlight:
    """A step sent to the replica whose answer is not applied yet."""

    plan: StepPlan
    record: StepRecord
    shape: CallShape
    call: asyncio.Future[shard_pb2.StepResponse]
    answered: float | None = None
    """time.monotonic() when the call ended (it may wait a while to be applied)."""

    def mark_answered(self, _) -> None:
        self.answered = time.monotonic()


class Engine:
    """Drives one replica: its own scheduler, KV accounting and step loop."""

    def __init__(
        self,
        index: int,
        scheduler: Scheduler,
        replica: ReplicaClient,
        tokenizer: Tokenizer,
        eos_token_ids: tuple[int, ...],
        batcher: DynamicBatcher | None = None,
        supervision: SupervisionConfig | None = None,
        telemetry: ReplicaTelemetry | None = None,
        stall_timeout_s: float = 60.0,
    ) -> None:
        self.index = index
        self.supervision = supervision
        """Deadlines and heartbeats; None: calls wait as long as they take, and no heartbeat."""
        self.deadlines = None if supervision is None else self._new_deadlines()
        self._last_answer = time.monotonic()
        """When the replica last answered a call."""
        self.stall_timeout_s = stall_timeout_s
        """A request held back this long for its stream's reader ends DEADLINE_EXCEEDED."""
        self.healthy = True
        self.failed = asyncio.Event()
        """Set when the replica fails; the supervisor waits on it."""
        self._restored = asyncio.Event()
        self.on_orphans: Callable[[list[RequestHandle], str], None] | None = None
        """Receives the generations of a failed or stopping replica, and why (FAILURE,
        PREEMPTION), to continue elsewhere; without it they end UNAVAILABLE."""
        self.on_state_change: Callable[[], None] | None = None
        """Called when the replica serves again after a restart, or stays down for good."""
        self.preempted = False
        """The replica was handed over because its driver is stopping (not failed): the
        supervisor lets its processes exit by themselves before it restarts it."""
        self.abandoned = False
        """Its supervisor gave up: it will not serve again."""
        self._stopping = False
        """Its driver said it is stopping: hand every generation over at the next step boundary."""
        self.scheduler = scheduler
        self.replica = replica
        self._watch_replica(replica)
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.batcher = batcher
        # Default: cost accounting and metrics of its own, no tracing, one device.
        self.telemetry = telemetry if telemetry is not None else Telemetry(TelemetryConfig()).replica(index, 1)
        self._handles: dict[int, RequestHandle] = {}
        self._seq_ids = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._embed_jobs: list[EmbedJob] = []
        """Calls taken from the batcher whose inputs are not all computed yet."""
        self._last_was_embed = False
        self._embed_step_ids = itertools.count(1)
        self._in_flight: deque[StepInFlight] = deque()
        """Steps sent and not applied yet, oldest first (at most two with async scheduling)."""
        self.num_forward_passes = 0
        self.num_embed_forward_passes = 0
        if batcher is not None:
            batcher.add_listener(self._wakeup.set)

    def submit(
        self, valid: ValidRequest, deadline: float | None = None, stream: OutputStream | None = None, cache_salt: bytes = b""
    ) -> RequestHandle:
        """Queues a request; `stream` is its caller's (default: a stream of its own that never
        holds it back), `cache_salt` the salt of its block hashes (server/tenancy.py)."""
        request = Request(next(self._seq_ids), valid.request_id, valid.prompt_ids, valid.params, valid.priority, deadline)
        request.cache_salt = cache_salt
        output = OutputProcessor(self.tokenizer, valid.prompt_ids, valid.params, valid.stop, self.eos_token_ids)
        handle = RequestHandle(request, self.index, output, stream if stream is not None else OutputStream(limit=1 << 62))
        self._handles[request.seq_id] = handle
        self.scheduler.add(request)
        self._wakeup.set()
        return handle

    def adopt(self, handle: RequestHandle, cause: str = FAILURE) -> None:
        """Takes over a generation of a failed or stopping replica (or of this one before its
        restart): a new sequence with the same prompt and generated tokens, queued in its old
        place (arrival and priority unchanged) and computed again from position 0, as after a
        preemption. Its output processor (detokenizer, stop strings, token count) stays with the
        handle, so its stream goes on where it was. One that had started counts a resume."""
        old = handle.request
        request = old.moved(next(self._seq_ids))
        if old.first_scheduled is not None:
            request.num_resumes += 1
            self.telemetry.request_resumed(handle.span, request, handle.replica, cause)
            log.info(
                "request %s resumes on replica %d after %d generated tokens (%s of replica %d)",
                request.request_id,
                self.index,
                len(request.output_ids),
                cause,
                handle.replica,
            )
        handle.request = request
        handle.replica = self.index
        handle.held_since = None  # this engine's loop must be woken when its stream drains
        self._handles[request.seq_id] = handle
        self.scheduler.add(request)
        self._wakeup.set()

    def cancel(self, handle: RequestHandle) -> None:
        """Ends a request its caller gave up on; its KV blocks are free before the next step."""
        if not handle.done:
            self._finish(handle, FinishReason.CANCELLED)

    def cancel_all(self) -> None:
        """Ends every request with finish reason `cancelled` (a drain that ran out of time)."""
        for handle in list(self._handles.values()):
            self.cancel(handle)

    def fail(self, reason: str, cause: str = FAILURE) -> None:
        """Marks the replica failed (or, with cause PREEMPTION, handed over: its driver is
        stopping). Every generation it serves goes to on_orphans, with its tokens so far, to
        continue on another replica; embedding calls end UNAVAILABLE."""
        if not self.healthy:
            return
        if cause == PREEMPTION:
            log.warning("replica %d is stopping (%s): moving its %d generations", self.index, reason, len(self._handles))
        else:
            log.error("replica %d failed: %s", self.index, reason)
        self.healthy = False
        self.preempted = cause == PREEMPTION
        self._stopping = False
        self._restored.clear()
        self._drop_steps_in_flight("the replica failed")
        orphans = []
        for handle in list(self._handles.values()):
            handle.was_running = handle.request.status is Status.RUNNING
            self.scheduler.finish(handle.request, FinishReason.ERROR)
            del self._handles[handle.request.seq_id]
            orphans.append(handle)
        for job in self._embed_jobs:
            job.fail(grpc.StatusCode.UNAVAILABLE, "the model replica serving this call failed")
        self._embed_jobs = []
        self.failed.set()
        if self.on_orphans is not None:
            self.on_orphans(orphans, cause)
        else:
            for handle in orphans:
                handle.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, "the model replica serving this request failed"))

    def restore(self, replica: ReplicaClient, scheduler: Scheduler) -> None:
        """Resumes on a restarted replica, with its fresh KV cache (and step times learnt anew)."""
        self.replica = replica
        self._watch_replica(replica)
        self.scheduler = scheduler
        if self.supervision is not None:
            self.deadlines = self._new_deadlines()
        self._last_answer = time.monotonic()
        self.healthy = True
        self.preempted = False
        self.failed.clear()
        self._restored.set()
        self._wakeup.set()
        if self.on_state_change is not None:
            self.on_state_change()

    def abandon(self) -> None:
        """The replica stays down for good (its supervisor gave up)."""
        self.abandoned = True
        if self.on_state_change is not None:
            self.on_state_change()

    def _watch_replica(self, replica: ReplicaClient) -> None:
        def stopping() -> None:
            if replica is self.replica and self.healthy:
                self._stopping = True
                self._wakeup.set()

        replica.watch_stopping(stopping)

    async def run(self) -> None:
        try:
            while True:
                if not self.healthy:
                    await self._restored.wait()
                    continue
                try:
                    await self._iterate()
                except Exception as error:  # whatever went wrong, it fails this replica, not the gateway
                    log.exception("replica %d: error in its engine loop", self.index)
                    self.fail(f"engine error: {type(error).__name__}: {error}")
        finally:  # the loop is stopped (the gateway stops): no call outlives it
            self._drop_steps_in_flight("the engine stopped")

    async def _iterate(self) -> None:
        if self._stopping:  # no new step: apply those in flight, then hand over
            if self._in_flight:
                await self._apply_oldest_step()
            else:
                self.fail("its driver got SIGTERM", PREEMPTION)
            return
        now = time.monotonic()
        self._expire(now)
        self._hold_stalled(now)
        generation_waits = self.scheduler.has_work()
        if not (generation_waits and self._last_was_embed):
            if not self._embed_jobs and self.batcher is not None:
                self._embed_jobs = self.batcher.take(now)
            if self._embed_jobs:
                if self._in_flight:  # an embedding forward runs alone: the steps in flight answer first
                    await self._apply_oldest_step()
                    return
                self._last_was_embed = True
                await self._embed_step()
                return
        if generation_waits or self._in_flight:
            self._last_was_embed = False
            await self._generation_step()
            return
        heartbeat_in = self._seconds_until_heartbeat(now)
        if heartbeat_in == 0:
            await self._heartbeat()
            return
        self._wakeup.clear()
        batch_in = self.batcher.seconds_until_ready(now) if self.batcher is not None else None
        timeouts = [t for t in (heartbeat_in, batch_in, self._seconds_until_stall_end(now)) if t is not None]
        try:
            await asyncio.wait_for(self._wakeup.wait(), min(timeouts, default=None))
        except asyncio.TimeoutError:
            pass

    def _new_deadlines(self) -> StepDeadlines:
        supervision = self.supervision
        return StepDeadlines(supervision.step_timeout_s, supervision.step_timeout_multiple, supervision.step_timeout_floor_s)

    def _seconds_until_heartbeat(self, now: float) -> float | None:
        """None when no heartbeat is due ever (none configured), 0 when one is due now."""
        if self.supervision is None or not self.supervision.heartbeat_interval_s:
            return None
        return max(0.0, self._last_answer + self.supervision.heartbeat_interval_s - now)

    async def _heartbeat(self) -> None:
        """Asks the idle replica's driver to check that every rank answers."""
        try:
            await self.replica.heartbeat(timeout=self.deadlines.floor_s)
        except grpc.aio.AioRpcError as error:
            self.fail(f"heartbeat: {_describe(error, self.deadlines.floor_s)}")
            return
        except asyncio.CancelledError:
            if not self._closed_under_call():
                raise
            return
        self._last_answer = time.monotonic()

    def _closed_under_call(self) -> bool:
        """A call to the replica was cancelled because the replica failed meanwhile and its
        supervisor closed the channel (not because this task is being cancelled)."""
        return not self.healthy and not asyncio.current_task().cancelling()

    def _timeout(self, shape: CallShape) -> float | None:
        return None if self.deadlines is None else self.deadlines.timeout(shape)

    def _answered(self, shape: CallShape, started: float, answered: float | None = None) -> None:
        self._last_answer = time.monotonic() if answered is None else answered
        if self.deadlines is not None:
            self.deadlines.record(shape, self._last_answer - started)

    async def _generation_step(self) -> None:
        """Sends steps while fewer than the depth (2 with async scheduling, else 1) are in
        flight and some request can take one; then applies the oldest step's answer."""
        depth = 2 if self.scheduler.config.async_scheduling else 1
        while len(self._in_flight) < depth and self.scheduler.has_work():
            plan = self.scheduler.schedule()
            if self._in_flight and not plan.chunks and not plan.free_seq_ids:
                break  # a waiting request that does not fit yet: nothing to send before the step in flight answers
            self._send(plan)
        await self._apply_oldest_step()

    def _send(self, plan: StepPlan) -> None:
        ahead = list(self._in_flight)
        if ahead:
            plan.after_step_id = ahead[-1].plan.step_id
        self.num_forward_passes += 1
        record = self.telemetry.step_started(plan)
        shape = _step_shape(plan)
        timeout = self._timeout(shape)
        if timeout is not None:  # the call also waits for the steps ahead of it (the engine's own wait is exact)
            timeout += sum(self._timeout(step.shape) for step in ahead)
        call = asyncio.ensure_future(self.replica.step(plan, timeout, metadata=record.metadata, report_timings=record.report_timings))
        step = StepInFlight(plan, record, shape, call)
        call.add_done_callback(step.mark_answered)
        self._in_flight.append(step)

    async def _apply_oldest_step(self) -> None:
        """Waits for the oldest step in flight (within its deadline, counted from when the step
        before it answered: the replica runs them one after the other) and applies its tokens."""
        step = self._in_flight[0]
        started = max(step.record.start, self._last_answer)
        timeout = self._timeout(step.shape)
        wait = None if timeout is None else max(0.0, started + timeout - time.monotonic())
        await asyncio.wait([step.call], timeout=wait)
        if not self._in_flight or self._in_flight[0] is not step:
            return  # the replica failed meanwhile: fail() dropped the steps in flight
        self._in_flight.popleft()
        plan = step.plan
        if not step.call.done():
            step.call.cancel()
            self.telemetry.step_failed(step.record, "deadline exceeded")
            self.fail(f"step {plan.step_id}: DEADLINE_EXCEEDED: no answer within {timeout:.2f} s")
            return
        try:
            response = step.call.result()
        except grpc.aio.AioRpcError as error:
            self.telemetry.step_failed(step.record, error.details() or error.code().name)
            # A stopping driver refuses new sequences (ABORTED), maybe before its notice came: a hand-over.
            stopping = self._stopping or error.code() is grpc.StatusCode.ABORTED
            self.fail(f"step {plan.step_id}: {_describe(error, timeout)}", PREEMPTION if stopping else FAILURE)
            return
        except asyncio.CancelledError:  # the call's own (this task was not cancelled: it awaited above)
            # The supervisor closed a failed replica's channel under it; fail() does nothing then.
            self.telemetry.step_failed(step.record, "its call was cancelled")
            self.fail(f"step {plan.step_id}: its call was cancelled")
            return
        except BaseException as error:
            self.telemetry.step_failed(step.record, f"{type(error).__name__}: {error}")
            raise
        step.record.start = started  # its device time starts when the replica started it
        self._answered(step.shape, started, step.answered)
        self.telemetry.step_finished(step.record, response)
        per_step = len(response.tokens) // plan.num_steps  # step-major: each step samples the same chunks
        for index in range(plan.num_steps):
            tokens = response.tokens[index * per_step : (index + 1) * per_step]
            sampled = {token.seq_id: (token.token_id, token.logprob) for token in tokens}
            for request in self.scheduler.update(plan, sampled):
                self._on_token(self._handles[request.seq_id])
        # Let the streams send these tokens now. Without async scheduling they go out before the
        # next step starts: on a host whose cores the replica's threads fill, sending them during
        # the step slows the step more. With it, the next step runs already.
        await asyncio.sleep(0)

    def _drop_steps_in_flight(self, reason: str) -> None:
        """Cancels the calls of the steps in flight; their tokens will never be applied."""
        while self._in_flight:
            step = self._in_flight.popleft()
            step.call.cancel()
            self.telemetry.step_failed(step.record, reason)

    async def _embed_step(self) -> None:
        """Runs one forward over the next inputs of the taken calls, in KV blocks lent from the
        block manager for this forward only."""
        items = self._pack_embed_inputs()
        if not items:  # cannot happen for validated inputs (each fits the budget and the cache)
            job = self._embed_jobs.pop(0)
            job.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "inputs: an input does not fit the replica's KV cache")
            return
        now = time.monotonic()
        for job, _, _ in items:
            if job.first_scheduled is None:
                job.first_scheduled = now
        self.num_forward_passes += 1
        self.num_embed_forward_passes += 1
        step_id = next(self._embed_step_ids)
        shape = CallShape(EMBED, sum(len(item.token_ids) for _, _, item in items))
        timeout, started = self._timeout(shape), time.monotonic()
        try:
            response = await self.replica.embed(step_id, [item for _, _, item in items], timeout)
        except grpc.aio.AioRpcError as error:
            self.fail(f"embedding batch {step_id}: {_describe(error, timeout)}")
            return
        except asyncio.CancelledError:
            if not self._closed_under_call():
                raise
            return
        finally:
            for _, _, item in items:
                self.scheduler.return_blocks(item.block_ids)
        self._answered(shape, started)
        row = response.hidden_size * 4
        for position, (job, index, _) in enumerate(items):
            if not job.done:  # a call cancelled while the forward ran gets nothing
                job.set_vector(index, response.vectors[position * row : (position + 1) * row])
        self._embed_jobs = [job for job in self._embed_jobs if not job.done]

    def _pack_embed_inputs(self) -> list[tuple[EmbedJob, int, EmbedItem]]:
        """The pending inputs of the taken calls, in order, while they fit the step's token
        budget and the free KV blocks. The first input gets its blocks even if running requests
        must be preempted for them, so an embedding batch never waits on generation."""
        budget = self.scheduler.config.max_batch_tokens
        items: list[tuple[EmbedJob, int, EmbedItem]] = []
        pending = ((job, index) for job in self._embed_jobs for index in job.pending_inputs())
        for job, index in pending:
            tokens = job.inputs[index]
            if len(tokens) > budget:
                break
            table = self.scheduler.lend_blocks(len(tokens), preempt=not items)
            if table is None:
                break
            items.append((job, index, EmbedItem(tokens, table, job.pooling, job.normalize)))
            budget -= len(tokens)
        return items

    def _expire(self, now: float) -> None:
        """Ends every request and taken embedding call whose deadline has passed."""
        for handle in [h for h in self._handles.values() if h.request.deadline is not None and h.request.deadline <= now]:
            request = handle.request
            if request.first_scheduled is None:
                message = f"deadline exceeded while queued (waited {now - request.arrival:.3f} s)"
            else:
                message = f"deadline exceeded after {len(request.output_ids)} generated tokens"
            self._abort(handle, grpc.StatusCode.DEADLINE_EXCEEDED, message)
        for job in self._embed_jobs:
            if job.deadline is not None and job.deadline <= now:
                job.fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before all inputs were embedded")
        self._embed_jobs = [job for job in self._embed_jobs if not job.done]

    def _hold_stalled(self, now: float) -> None:
        """Holds back the requests whose stream is over its bound of undelivered output (they
        keep their blocks), wakes the loop when it drains, and ends those held past the stall
        timeout: DEADLINE_EXCEEDED, blocks freed."""
        for handle in list(self._handles.values()):
            held = handle.stream.over
            handle.request.held = held
            if not held:
                handle.held_since = None
                continue
            if handle.held_since is None:
                handle.held_since = now
                handle.stream.call_on_room(self._wakeup.set)
            elif now - handle.held_since >= self.stall_timeout_s:
                message = (
                    f"the client read none of this stream's output for {self.stall_timeout_s:g} s (--stream-stall-timeout): "
                    f"the request ended after {len(handle.request.output_ids)} generated tokens and its KV cache was freed"
                )
                self._abort(handle, grpc.StatusCode.DEADLINE_EXCEEDED, message)
                if handle.on_stall_end is not None:
                    handle.on_stall_end()

    def _seconds_until_stall_end(self, now: float) -> float | None:
        """Until the first held request's stall timeout or deadline (the loop must wake to end it)."""
        ends = [
            min(handle.held_since + self.stall_timeout_s, handle.request.deadline or float("inf"))
            for handle in self._handles.values()
            if handle.held_since is not None
        ]
        return max(0.0, min(ends) - now) if ends else None

    def _on_token(self, handle: RequestHandle) -> None:
        request = handle.request
        logprob = request.output_logprobs[-1] if request.output_logprobs else None
        event, reason = handle.output.add(request.output_ids[-1], logprob)
        handle.put(event)
        if reason is not None:
            self._finish(handle, reason)

    def _finish(self, handle: RequestHandle, reason: FinishReason) -> None:
        self.scheduler.finish(handle.request, reason)
        del self._handles[handle.request.seq_id]
        handle.put(handle.output.finish(reason))

    def _abort(self, handle: RequestHandle, code: grpc.StatusCode, message: str) -> None:
        self.scheduler.finish(handle.request, FinishReason.ERROR)
        del self._handles[handle.request.seq_id]
        handle.put(ErrorEvent(code, message))

    @property
    def num_active(self) -> int:
        return len(self._handles)


def _describe(error: grpc.aio.AioRpcError, timeout: float | None) -> str:
    if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
        return f"DEADLINE_EXCEEDED: no answer within {timeout:.2f} s"
    return f"{error.code().name} {error.details()}"


def _step_shape(plan: StepPlan) -> CallShape:
    decode_only = all(chunk.num_tokens == 1 for chunk in plan.chunks)
    return CallShape(DECODE if decode_only else PREFILL, sum(chunk.num_tokens for chunk in plan.chunks), plan.num_steps)
