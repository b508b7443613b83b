"""gRPC handlers of the public Inference service: validate, admit, submit, relay events."""

from __future__ import annotations

import array
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from tokenizers import Tokenizer

from shardgate.proto import inference_pb2, inference_pb2_grpc
from shardgate.server.admission import Admission, QueueLoad, Ticket
from shardgate.server.config import GatewayConfig
from shardgate.server.embed_batcher import DynamicBatcher, EmbedJob
from shardgate.server.engine import ErrorEvent, Event, FinishEvent, RequestHandle, TokenEvent, usage_times
from shardgate.server.replicas.client import ReplicaInfo
from shardgate.server.replicas.router import Router
from shardgate.server.replicas.supervisor import ReplicaSupervisor
from shardgate.server.request import FinishReason
from shardgate.server.telemetry import Telemetry
from shardgate.server.validation import ModelLimits, RequestError, invalid, validate, validate_embed

_FINISH_REASONS = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: inference_pb2.FINISH_REASON_EOS,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}


def _usage(handle: RequestHandle, telemetry: Telemetry) -> inference_pb2.Usage:
    request = handle.request
    queue, ttft = usage_times(request)
    return inference_pb2.Usage(
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=len(request.output_ids),
        cached_tokens=request.num_cached_tokens,
        queue_time_s=queue,
        time_to_first_token_s=ttft,
        replica=handle.replica,
        device_seconds=request.device_seconds,
        cost=telemetry.cost(request.device_seconds),
    )


def _stream_message(
    handle: RequestHandle, events: list[TokenEvent | FinishEvent], telemetry: Telemetry
) -> inference_pb2.GenerateStreamResponse:
    """One stream message for the events ready together: their tokens and text, and the finish
    reason and usage when the last of them ends the request."""
    tokens = [event for event in events if isinstance(event, TokenEvent)]
    message = inference_pb2.GenerateStreamResponse(
        request_id=handle.request.request_id,
        text="".join(event.text for event in events),
        token_ids=[event.token_id for event in tokens],
        logprobs=[event.logprob for event in tokens if event.logprob is not None],
    )
    if isinstance(events[-1], FinishEvent):
        message.finish_reason = _FINISH_REASONS[events[-1].reason]
        message.usage.CopyFrom(_usage(handle, telemetry))
    return message


def _deadline(timeout_s: float | None, context: grpc.aio.ServicerContext) -> float | None:
    """The earlier of the request's own timeout and the call's gRPC deadline, as time.monotonic()."""
    now = time.monotonic()
    remaining = context.time_remaining()
    candidates = [now + t for t in (timeout_s, remaining) if t is not None]
    return min(candidates, default=None)


def _vector(data: bytes) -> array.array:
    """Little-endian float32 bytes as an array of floats."""
    values = array.array("f")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values


@dataclass(frozen=True)
class _Generation:
    """A submitted generation request and its place in the admission count."""

    handle: RequestHandle
    ticket: Ticket


_WAKE = object()


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Registered before the model loads (so health can say NOT_SERVING); calls before
    `attach` get UNAVAILABLE."""

    def __init__(self, config: GatewayConfig, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.router: Router | None = None
        self.draining = False
        """Set on SIGTERM: new calls get UNAVAILABLE while in-flight ones finish."""

    def attach(
        self, router: Router, batcher: DynamicBatcher, tokenizer: Tokenizer, infos: list[ReplicaInfo], supervisors: list[ReplicaSupervisor]
    ) -> None:
        self.router = router
        self.supervisors = supervisors
        self.batcher = batcher
        self.tokenizer = tokenizer
        self.infos = infos
        max_context = min(infos[0].max_position_embeddings, *(info.kv_capacity_tokens for info in infos))
        self.limits = ModelLimits(
            vocab_size=infos[0].vocab_size,
            max_context_tokens=max_context,
            max_embed_tokens=min(max_context, self.config.scheduler.max_batch_tokens),
        )
        self.admission = Admission(self.config.admission, self._queue_load)

    def _queue_load(self) -> QueueLoad:
        schedulers = [engine.scheduler for engine in self.router.engines]
        return QueueLoad(
            requests=sum(len(s.waiting) for s in schedulers) + self.batcher.num_queued_requests,
            tokens=sum(s.num_waiting_tokens for s in schedulers) + self.batcher.num_queued_tokens,
        )

    def in_flight(self) -> int:
        """Calls admitted and not yet ended (generations and Embed calls)."""
        return self.admission.active if self.router is not None else 0

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if self.router is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")

    def _start(self, message: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> _Generation:
        """Validates, admits and submits a request; raises RequestError when it is refused."""
        try:
            with self.telemetry.tracer.start_as_current_span("validate"):
                valid = validate(message, self.tokenizer, self.limits, self.config)
            ticket = self.admission.admit(len(valid.prompt_ids))
        except RequestError as error:
            self.telemetry.request_rejected(message.request_id, error.code)
            raise
        try:
            handle = self.router.submit(valid, _deadline(valid.timeout_s, context))
        except RequestError as error:
            ticket.release()
            self.telemetry.request_rejected(message.request_id, error.code)
            raise
        call_span = trace.get_current_span().get_span_context()
        if call_span.is_valid:
            handle.request.span_context = call_span
        return _Generation(handle, ticket)

    async def _start_or_abort(self, message: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> _Generation:
        await self._require_ready(context)
        try:
            return self._start(message, context)
        except RequestError as error:
            await context.abort(error.code, str(error))

    async def _events(self, generation: _Generation) -> AsyncIterator[list[Event]]:
        """Yields a request's events in batches (those ready at once: a replica that ran several
        decode steps in one round trip hands over several tokens together, and they go out as
        one message), up to its last (a FinishEvent or an ErrorEvent, always last in its batch);
        cancels the request if the consumer stops first. Consumers iterate it under aclosing(),
        so the request is cancelled and counted out before their call ends, however it ends."""
        call_span = trace.get_current_span()
        code = grpc.StatusCode.CANCELLED  # unless it ends otherwise: the caller went away
        queue = generation.handle.events
        try:
            while True:
                batch = [await queue.get()]
                while isinstance(batch[-1], TokenEvent) and not queue.empty():
                    batch.append(queue.get_nowait())
                last = batch[-1]
                if isinstance(last, ErrorEvent):
                    code = last.code
                elif isinstance(last, FinishEvent):
                    code = grpc.StatusCode.OK
                yield batch
                if isinstance(last, (FinishEvent, ErrorEvent)):
                    return
        finally:
            self.router.cancel(generation.handle)
            generation.ticket.release()
            self.telemetry.request_finished(generation.handle, code, call_span)

    async def Generate(self, request, context) -> inference_pb2.GenerateResponse:
        generation = await self._start_or_abort(request, context)
        text, token_ids, logprobs = [], [], []
        async with aclosing(self._events(generation)) as batches:
            async for batch in batches:
                for event in batch:
                    if isinstance(event, ErrorEvent):
                        await context.abort(event.code, event.message)
                    text.append(event.text)
                    if isinstance(event, TokenEvent):
                        token_ids.append(event.token_id)
                        if event.logprob is not None:
                            logprobs.append(event.logprob)
                    else:
                        reason = event.reason
        handle = generation.handle
        return inference_pb2.GenerateResponse(
            request_id=handle.request.request_id,
            text="".join(text),
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=_FINISH_REASONS[reason],
            usage=_usage(handle, self.telemetry),
        )

    async def GenerateStream(self, request, context) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        generation = await self._start_or_abort(request, context)
        async with aclosing(self._events(generation)) as batches:
            async for batch in batches:
                error = batch.pop() if isinstance(batch[-1], ErrorEvent) else None
                if batch:
                    yield _stream_message(generation.handle, batch, self.telemetry)
                if error is not None:
                    await context.abort(error.code, error.message)

    async def GenerateBidi(self, request_iterator, context) -> AsyncIterator[inference_pb2.GenerateBidiResponse]:
        """Requests start as their messages arrive; each one's messages go out as they are made.
        The stream ends once the client has half-closed and every request on it has ended;
        if the call itself ends first (cancelled, deadline), every live request is cancelled."""
        await self._require_ready(context)
        out: asyncio.Queue = asyncio.Queue()
        live: dict[str, _Generation] = {}
        relays: set[asyncio.Task] = set()

        def fail(request_id: str, code: grpc.StatusCode, message: str) -> None:
            status = inference_pb2.RequestStatus(request_id=request_id, code=code.value[0], message=message)
            out.put_nowait(inference_pb2.GenerateBidiResponse(error=status))

        async def relay(request_id: str, generation: _Generation) -> None:
            try:
                async with aclosing(self._events(generation)) as batches:
                    async for batch in batches:
                        error = batch.pop() if isinstance(batch[-1], ErrorEvent) else None
                        if batch:
                            out.put_nowait(
                                inference_pb2.GenerateBidiResponse(message=_stream_message(generation.handle, batch, self.telemetry))
                            )
                        if error is not None:
                            fail(request_id, error.code, error.message)
            finally:
                del live[request_id]
                out.put_nowait(_WAKE)

        def start(message: inference_pb2.GenerateRequest) -> None:
            request_id = message.request_id
            try:
                if not request_id:
                    raise invalid("request_id", "must be set on a multiplexed stream")
                if request_id in live:
                    raise invalid("request_id", f"{request_id!r} is already live on this stream")
                generation = self._start(message, context)
            except RequestError as error:
                fail(request_id, error.code, str(error))
                return
            live[request_id] = generation
            task = asyncio.create_task(relay(request_id, generation), name=f"bidi {request_id}")
            relays.add(task)
            task.add_done_callback(relays.discard)

        async def read() -> None:
            async for message in request_iterator:
                action = message.WhichOneof("action")
                if action == "generate":
                    start(message.generate)
                elif action == "cancel":
                    # Cancelling a finished or unknown request does nothing: it has ended already.
                    generation = live.get(message.cancel.request_id)
                    if generation is not None:
                        self.router.cancel(generation.handle)
                else:
                    fail("", grpc.StatusCode.INVALID_ARGUMENT, "action: must be generate or cancel")

        reader = asyncio.create_task(read(), name="bidi reader")
        reader.add_done_callback(lambda _: out.put_nowait(_WAKE))
        try:
            while True:
                item = await out.get()
                if item is not _WAKE:
                    yield item
                elif reader.done() and not live and out.empty():  # ended requests' messages all sent
                    reader.result()  # a broken request stream ends the call with its error
                    return
        finally:
            reader.cancel()
            for task in list(relays):
                task.cancel()
            for generation in live.values():  # also those whose relay never started
                self.router.cancel(generation.handle)
                generation.ticket.release()

    async def Embed(self, request, context) -> inference_pb2.EmbedResponse:
        await self._require_ready(context)
        try:
            valid = validate_embed(request, self.tokenizer, self.limits, self.config)
            ticket = self.admission.admit(sum(len(ids) for ids in valid.inputs))
        except RequestError as error:
            await context.abort(error.code, str(error))
        job = EmbedJob(valid.request_id, valid.inputs, valid.pooling, valid.normalize, valid.priority, _deadline(valid.timeout_s, context))
        self.batcher.submit(job)
        try:
            await job.finished.wait()
        finally:
            ticket.release()
            if not job.done:
                self.batcher.cancel(job)
        if job.error is not None:
            await context.abort(*job.error)
        return inference_pb2.EmbedResponse(
            request_id=job.request_id,
            embeddings=[inference_pb2.Embedding(values=_vector(v), tokens=len(ids)) for v, ids in zip(job.vectors, job.inputs)],
            usage=inference_pb2.Usage(prompt_tokens=job.num_tokens, queue_time_s=job.first_scheduled - job.arrival),
        )

    async def ServerStatus(self, request, context) -> inference_pb2.ServerStatusResponse:
        await self._require_ready(context)
        load = self._queue_load()
        replicas = [
            inference_pb2.ReplicaStatus(
                total_kv_blocks=engine.scheduler.blocks.num_blocks,
                free_kv_blocks=engine.scheduler.blocks.num_free,
                running_requests=len(engine.scheduler.running),
                waiting_requests=len(engine.scheduler.waiting),
                preemptions=engine.scheduler.num_preemptions,
                forward_passes=engine.num_forward_passes,
                embed_forward_passes=engine.num_embed_forward_passes,
                started_requests=engine.scheduler.num_started,
                healthy=engine.healthy,
                restarts=supervisor.restarts,
            )
            for engine, supervisor in zip(self.router.engines, self.supervisors)
        ]
        return inference_pb2.ServerStatusResponse(
            active_requests=self.admission.active, queued_requests=load.requests, queued_tokens=load.tokens, replicas=replicas
        )

    async def Tokenize(self, request, context) -> inference_pb2.TokenizeResponse:
        await self._require_ready(context)
        encoding = self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        return inference_pb2.TokenizeResponse(token_ids=encoding.ids, tokens=encoding.tokens)

    async def ModelInfo(self, request, context) -> inference_pb2.ModelInfoResponse:
        await self._require_ready(context)
        info = self.infos[0]
        return inference_pb2.ModelInfoResponse(
            model=info.model,
            model_type=info.model_type,
            vocab_size=info.vocab_size,
            max_context_tokens=self.limits.max_context_tokens,
            max_new_tokens_limit=self.config.max_new_tokens_limit,
            dtype=info.dtype,
            tp=info.tp,
            pp=info.pp,
            replicas=len(self.infos),
            kv_capacity_tokens=[i.kv_capacity_tokens for i in self.infos],
            devices=[device for i in self.infos for device in i.devices],
            eos_token_ids=list(info.eos_token_ids),
            hidden_size=info.hidden_size,
            max_embed_inputs=self.config.embed.max_inputs,
            quantization=info.quantization,
            weight_bytes_per_step=info.weight_bytes_per_step,
            kv_bytes_per_token=info.kv_bytes_per_token,
            num_hidden_layers=info.num_hidden_layers,
            num_key_value_heads=info.num_key_value_heads,
            head_dim=info.head_dim,
        )
