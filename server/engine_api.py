"""The engine API: the one interface every frontend uses (today the gRPC service, service.py).

Behind it: input processing (validate and tokenize), admission (a request holds its place from
submission until its outputs end), replica choice and failover (replicas/router.py), each
replica's engine loop (engine.py) and draining. Requests arrive as the public protobuf messages
(the public schema is the engine's request type; other protocols translate into it), with the
transport's deadline given apart as a time.monotonic() instant. Every refusal or failure is a
RequestError carrying the gRPC status code to answer with.

All methods run on the event loop's thread, as the engine loops do; work that grows with an
input's size (tokenizing, rendering chat templates) runs on the tokenizer pool's threads
(tokenizer_pool.py), after the checks that cost nothing per character (a prompt the context could
never hold is refused by its length alone, input_size.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import grpc
from opentelemetry import trace
from tokenizers import Tokenizer

from shardgate.proto import inference_pb2, shard_pb2
from shardgate.server.admission import Admission, QueueLoad, Ticket
from shardgate.server.chat_template import ChatTemplate
from shardgate.server.config import GatewayConfig
from shardgate.server.delivery import Outbox, OutputStream
from shardgate.server.embed_batcher import DynamicBatcher, EmbedJob
from shardgate.server.engine import Engine, RequestHandle
from shardgate.server.input_size import chars_per_token_bound
from shardgate.server.measures import GENAI_CHAT, GENAI_EMBEDDINGS, GENAI_OPERATION, ReplicaStatus
from shardgate.server.output_processor import ErrorEvent, FinishEvent, TokenEvent
from shardgate.server.replicas.router import Router
from shardgate.server.replicas.supervisor import ReplicaSupervisor
from shardgate.server.request import FinishReason
from shardgate.server.telemetry import Telemetry
from shardgate.server.tenancy import cache_salt
from shardgate.server.tokenizer_pool import TokenizerPool
from shardgate.server.validation import (
    ModelLimits,
    RequestError,
    SamplingDefaults,
    ValidRequest,
    check_embed_sizes,
    check_sizes,
    encode,
    tokenize_chat,
    validate,
    validate_embed,
)

log = logging.getLogger("shardgate.server")

LOADING_RETRY_DELAY_S = 5.0
"""The wait a call refused while the model loads suggests (loading takes seconds to minutes)."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    resumes: int
    """Times the generation moved to another replica and continued there."""
    queue_time_s: float
    """0 if the request never ran."""
    time_to_first_token_s: float
    """0 if no token came."""
    replica: int
    device_seconds: float
    cost: float


@dataclass(frozen=True)
class GenerateOutput:
    """The tokens of a request that were ready together (a replica that ran several decode
    steps in one round trip hands over several at once) and the text they made visible; the
    last output of a request carries its finish reason and usage."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    """One per token when the request asked for logprobs, else empty."""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class EmbedOutput:
    request_id: str
    vectors: list[bytes]
    """Each input's vector as little-endian float32 bytes."""
    input_tokens: list[int]
    """Tokens of each input."""
    queue_time_s: float

    @property
    def prompt_tokens(self) -> int:
        return sum(self.input_tokens)


@dataclass(frozen=True)
class Tokenized:
    text: str
    """What was tokenized: the text given, or the prompt the chat template made of the messages."""
    token_ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class PreparedRequest:
    """A generation request validated and tokenized (EngineAPI.prepare), for EngineAPI.submit."""

    valid: ValidRequest
    operation: str
    protocol: str
    span: trace.Span
    arrival: float
    """When prepare() began, as time.monotonic(): the request's timeout_ms counts from here."""
    tenant: str | None
    """The caller's API key's opaque id (tenancy.py), for the per-key quota."""
    salt: bytes
    """The salt of its prefix-cache block hashes (tenancy.cache_salt)."""


@dataclass(frozen=True)
class ServerStatus:
    active_requests: int
    """Calls admitted and not yet ended (generations and embeddings)."""
    queued_requests: int
    queued_tokens: int
    replicas: list[ReplicaStatus]


class Generation:
    """A submitted generation request. Iterate `outputs()` once, under contextlib.aclosing():
    however the iteration ends, the request is cancelled (if still running), its admission
    released and its end reported before the consumer's call ends. Pull the next output only
    once the transport took the previous one: the request holds its admission, and its tokens
    count against its stream's bound of undelivered output (delivery.py), until then."""

    def __init__(self, api: EngineAPI, handle: RequestHandle, ticket: Ticket, span: trace.Span) -> None:
        self._api = api
        self._handle = handle
        self._ticket = ticket
        self._span = span

    @property
    def request_id(self) -> str:
        return self._handle.request.request_id

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the request's prompt, as it was tokenized."""
        return len(self._handle.request.prompt_ids)

    async def outputs(self) -> AsyncIterator[GenerateOutput]:
        """The request's outputs up to the one with its finish reason; a request the server
        cannot finish raises RequestError after the outputs it made (a request that ends
        while its consumer still reads is reported with status CANCELLED)."""
        code = grpc.StatusCode.CANCELLED  # unless it ends otherwise: the consumer went away
        handle = self._handle
        queue = handle.events
        try:
            while True:
                batch = [await queue.get()]
                while isinstance(batch[-1], TokenEvent) and not queue.empty():
                    batch.append(queue.get_nowait())
                last = batch[-1]
                if isinstance(last, ErrorEvent):
                    code = last.code
                    batch.pop()
                    if batch:
                        yield self._output(batch)
                    raise RequestError(last.code, None, last.message)
                if isinstance(last, FinishEvent):
                    code = grpc.StatusCode.OK
                yield self._output(batch)
                # The consumer pulls again only once its transport took the output (see delivery.py).
                handle.delivered(len(batch))
                if isinstance(last, FinishEvent):
                    return
        finally:
            handle.delivered(handle.undelivered)  # what is left is dropped, not waited for
            self.abort()
            self._api.telemetry.request_finished(self._handle.request, self._handle.replica, code, self._span)

    def release_admission(self) -> None:
        """Lets the request's admission go before its last outputs are written: its reader stalled
        past --stream-stall-timeout. What it made stays counted against its stream's bound."""
        self._ticket.release()

    def abort(self) -> None:
        """Ends the request with finish reason `cancelled` (nothing if it has ended) and
        releases its admission; its outputs then end."""
        self._api.router.cancel(self._handle)
        self._ticket.release()

    def _output(self, events: list[TokenEvent | FinishEvent]) -> GenerateOutput:
        tokens = [event for event in events if isinstance(event, TokenEvent)]
        last = events[-1]
        return GenerateOutput(
            request_id=self.request_id,
            text="".join(event.text for event in events),
            token_ids=[event.token_id for event in tokens],
            logprobs=[event.logprob for event in tokens if event.logprob is not None],
            finish_reason=last.reason if isinstance(last, FinishEvent) else None,
            usage=self._usage() if isinstance(last, FinishEvent) else None,
        )

    def _usage(self) -> Usage:
        request = self._handle.request
        return Usage(
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(request.output_ids),
            cached_tokens=request.num_cached_tokens,
            resumes=request.num_resumes,
            queue_time_s=(request.first_scheduled - request.arrival) if request.first_scheduled else 0.0,
            time_to_first_token_s=(request.first_token - request.arrival) if request.first_token else 0.0,
            replica=self._handle.replica,
            device_seconds=request.device_seconds,
            cost=self._api.telemetry.cost(request.device_seconds),
        )


def _deadline(timeout_s: float | None, call_deadline: float | None, arrival: float) -> float | None:
    """The earlier of the request's own timeout (from its arrival) and the call's deadline."""
    candidates = [d for d in (call_deadline, None if timeout_s is None else arrival + timeout_s) if d is not None]
    return min(candidates, default=None)


def describe_model(
    descriptions: list[shard_pb2.DescribeResponse], limits: ModelLimits, config: GatewayConfig
) -> inference_pb2.ModelInfoResponse:
    """What clients see of the served model: the first replica's own description of it, with
    the gateway's limits and every replica's capacity and devices."""
    info = inference_pb2.ModelInfoResponse()
    info.CopyFrom(descriptions[0].model)
    info.max_context_tokens = limits.max_context_tokens
    info.max_new_tokens_limit = config.max_new_tokens_limit
    info.max_embed_inputs = config.embed.max_inputs
    info.replicas = len(descriptions)
    info.kv_capacity_tokens[:] = [capacity for d in descriptions for capacity in d.model.kv_capacity_tokens]
    info.devices[:] = [device for d in descriptions for device in d.model.devices]
    return info


def chat_template(description: shard_pb2.DescribeResponse) -> ChatTemplate | None:
    """The model's chat template with its special tokens' text; None when it has none."""
    if not description.chat_template:
        return None
    template = ChatTemplate(description.chat_template, description.bos_token or None, description.eos_token or None)
    if template.compile_error is not None:
        log.warning("chat requests will be refused: %s", template.compile_error)
    return template


class EngineAPI:
    """Exists before the model loads (every call then gets UNAVAILABLE); `attach` gives it the
    replicas' engines once they serve."""

    def __init__(self, config: GatewayConfig, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self._attached = False
        self.draining = False
        """Set by drain(): new calls get UNAVAILABLE while in-flight ones finish."""
        self.tokenizer_pool = TokenizerPool(config.tokenizer)

    def attach(
        self,
        engines: list[Engine],
        batcher: DynamicBatcher,
        tokenizer: Tokenizer,
        descriptions: list[shard_pb2.DescribeResponse],
        supervisors: list[ReplicaSupervisor],
    ) -> None:
        self.engines = engines
        supervision = self.config.supervision
        self.router = Router(engines, supervision.max_request_retries, supervision.resume_on_restart)
        self.batcher = batcher
        self.tokenizer = tokenizer
        self.descriptions = descriptions
        self.supervisors = supervisors
        first = descriptions[0]
        max_context = min(first.max_position_embeddings, *(d.num_kv_blocks * d.block_size for d in descriptions))
        self.limits = ModelLimits(
            vocab_size=first.model.vocab_size,
            max_context_tokens=max_context,
            max_embed_tokens=min(max_context, self.config.scheduler.max_batch_tokens),
            max_chars_per_token=chars_per_token_bound(tokenizer),
        )
        if self.limits.max_chars_per_token is None:
            log.info("the tokenizer may drop input or cover unbounded text with a token: long inputs are tokenized before refused")
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._token_names = [""] * (max(vocab.values(), default=-1) + 1)
        for name, token_id in vocab.items():
            self._token_names[token_id] = name
        self.chat_template = chat_template(first)
        self.sampling_defaults = SamplingDefaults.of_model(first.model)
        self.admission = Admission(self.config.admission, self._queue_load)
        self._attached = True

    @property
    def serving(self) -> bool:
        """Some replica can serve."""
        return self._attached and self.router.serving

    def open_stream(self) -> OutputStream:
        """A new stream for the requests whose output one call carries (delivery.py), bounded by --max-undelivered-tokens."""
        return OutputStream(self.config.streams.max_undelivered_tokens)

    def open_outbox(self) -> Outbox:
        """The outbox of a multiplexed call, with a stream of its own (delivery.py)."""
        return Outbox(self.open_stream(), self.config.streams.stall_timeout_s)

    async def prepare(self, request: inference_pb2.GenerateRequest, protocol: str = "grpc", tenant: str | None = None) -> PreparedRequest:
        """Validates a generation request and tokenizes its prompt off the event loop (one the
        context could never hold is refused at once, by its length); raises RequestError when it
        is refused. `protocol` names the frontend (grpc, openai, kserve) for the metrics. `tenant`
        is the caller's API key's opaque id (tenancy.py; None without keys): it scopes the per-key
        quota and the prefix cache. The request's span (GenAI conventions) starts in the current
        OpenTelemetry context: a frontend makes its call's context current first, so that the span
        joins the caller's trace."""
        self.check_ready()
        arrival = time.monotonic()
        operation = GENAI_CHAT if request.WhichOneof("input") == "messages" else GENAI_OPERATION
        span = self.telemetry.start_request(operation, protocol)
        try:
            with self.telemetry.tracer.start_as_current_span("validate", trace.set_span_in_context(span)):
                check_sizes(request, self.limits)
                salt = cache_salt(tenant, request.cache_salt, self.config.security.prefix_cache_sharing)
                valid = await self.tokenizer_pool.run(
                    partial(validate, request, self.tokenizer, self.limits, self.config, self.chat_template, self.sampling_defaults)
                )
        except RequestError as error:
            self.telemetry.request_rejected(request.request_id, operation, protocol, error.code, str(error), span)
            raise
        except asyncio.CancelledError:  # the caller went away while its input was processed
            message = "cancelled before it was submitted"
            self.telemetry.request_rejected(request.request_id, operation, protocol, grpc.StatusCode.CANCELLED, message, span)
            raise
        self.telemetry.request_validated(span, valid.params, valid.stop)
        return PreparedRequest(valid, operation, protocol, span, arrival, tenant, salt)

    def submit(self, prepared: PreparedRequest, deadline: float | None = None, stream: OutputStream | None = None) -> Generation:
        """Admits and submits a prepared request at once (no await between the admission check
        and the enqueue); raises RequestError when it is refused. `deadline` is the transport's,
        as time.monotonic(); the request's own timeout_ms also applies. `stream` is the call's
        output stream (open_stream(); a multiplexed call passes the same one with each request;
        default: a new one)."""
        valid, operation, protocol, span = prepared.valid, prepared.operation, prepared.protocol, prepared.span
        try:
            self.check_ready()  # the server may have begun to drain while the request was prepared
            ticket = self.admission.admit(len(valid.prompt_ids), prepared.tenant)
        except RequestError as error:
            self.telemetry.request_rejected(valid.request_id, operation, protocol, error.code, str(error), span)
            raise
        try:
            stream = stream if stream is not None else self.open_stream()
            handle = self.router.submit(valid, _deadline(valid.timeout_s, deadline, prepared.arrival), stream, prepared.salt)
            handle.on_stall_end = ticket.release
        except RequestError as error:
            ticket.release()
            self.telemetry.request_rejected(valid.request_id, operation, protocol, error.code, str(error), span)
            raise
        handle.request.protocol = protocol
        handle.request.operation = operation
        handle.span = span
        if span.get_span_context().is_valid:
            handle.request.span_context = span.get_span_context()
        return Generation(self, handle, ticket, span)

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        deadline: float | None = None,
        protocol: str = "grpc",
        tenant: str | None = None,
        stream: OutputStream | None = None,
    ) -> Generation:
        """prepare() then submit(): the submitted request, or RequestError when it is refused."""
        return self.submit(await self.prepare(request, protocol, tenant), deadline, stream)

    def refused(self, request_id: str, error: RequestError, protocol: str) -> None:
        """Records a generation request its frontend refused before handing it over (one that does
        not translate to a GenerateRequest): its span, metrics and log line are those of a request
        the engine API refused."""
        span = self.telemetry.start_request(GENAI_OPERATION, protocol)
        self.telemetry.request_rejected(request_id, GENAI_OPERATION, protocol, error.code, str(error), span)

    async def embed(
        self, request: inference_pb2.EmbedRequest, deadline: float | None = None, protocol: str = "grpc", tenant: str | None = None
    ) -> EmbedOutput:
        """Embeds the request's inputs (batched with other calls); raises RequestError when it
        is refused or fails. Cancelling the awaiting task ends the call. Its span (operation
        `embeddings`) starts in the current OpenTelemetry context, as generate()'s does;
        `tenant` counts it in its API key's quota, as generate()'s does."""
        self.check_ready()
        started = time.monotonic()
        span = self.telemetry.start_request(GENAI_EMBEDDINGS, protocol)
        request_id, input_tokens = request.request_id, 0
        code, message = grpc.StatusCode.CANCELLED, ""  # unless it ends otherwise: the caller went away
        try:
            check_embed_sizes(request, self.limits, self.config)
            valid = await self.tokenizer_pool.run(partial(validate_embed, request, self.tokenizer, self.limits, self.config))
            request_id, input_tokens = valid.request_id, sum(len(ids) for ids in valid.inputs)
            ticket = self.admission.admit(input_tokens, tenant)
            expires = _deadline(valid.timeout_s, deadline, started)
            job = EmbedJob(valid.request_id, valid.inputs, valid.pooling, valid.normalize, valid.priority, expires)
            self.batcher.submit(job)
            try:
                await job.finished.wait()
            finally:
                ticket.release()
                if not job.done:
                    self.batcher.cancel(job)
            if job.error is not None:
                raise RequestError(job.error[0], None, job.error[1])
            code = grpc.StatusCode.OK
        except RequestError as error:
            code, message = error.code, str(error)
            raise
        finally:
            self.telemetry.embed_finished(request_id, protocol, input_tokens, time.monotonic() - started, code, message, span)
        return EmbedOutput(job.request_id, list(job.vectors), [len(ids) for ids in job.inputs], job.first_scheduled - job.arrival)

    def abort(self, generation: Generation) -> None:
        """Ends a request with finish reason `cancelled` (nothing if it has ended)."""
        generation.abort()

    def abort_all(self) -> None:
        """Ends every generation request with finish reason `cancelled` (a drain out of time)."""
        if self._attached:
            self.router.cancel_all()

    def drain(self) -> None:
        """From now on new calls get UNAVAILABLE; in-flight ones go on."""
        self.draining = True

    def in_flight(self) -> int:
        """Calls admitted and not yet ended (generations and embeddings)."""
        return self.admission.active if self._attached else 0

    async def tokenize(self, request: inference_pb2.TokenizeRequest, tenant: str | None = None) -> Tokenized:
        """The request's text, or its messages as a generation request's are rendered and
        tokenized, with its token ids and token strings; RequestError for bad messages or when it
        is refused. Admitted as a generation is (it holds a place among the concurrent requests
        while it is tokenized, off the event loop); its length is bounded by the message size
        alone, since counting a long text's tokens is what it is for."""
        self.check_ready()
        ticket = self.admission.admit(0, tenant)
        try:
            return await self.tokenizer_pool.run(partial(self._tokenize, request))
        finally:
            ticket.release()

    def _tokenize(self, request: inference_pb2.TokenizeRequest) -> Tokenized:
        """On a pool thread. Token strings come from the vocabulary, item by item (the
        encoding's own list is built in one call that holds the GIL)."""
        if request.WhichOneof("input") == "messages":
            text, encoding = tokenize_chat(request.messages, self.chat_template, self.tokenizer, self.limits, None)
        else:
            text, encoding = request.text, encode(self.tokenizer, request.text, request.add_special_tokens)
        ids = encoding.ids
        return Tokenized(text, ids, [self._token_names[token_id] for token_id in ids])

    def close(self) -> None:
        """Stops the tokenizer pool's threads (at shutdown)."""
        self.tokenizer_pool.close()

    def describe(self) -> inference_pb2.ModelInfoResponse:
        self.check_ready()
        return describe_model(self.descriptions, self.limits, self.config)

    def status(self) -> ServerStatus:
        self.check_ready()
        load = self._queue_load()
        return ServerStatus(self.admission.active, load.requests, load.tokens, self.replicas())

    def replicas(self) -> list[ReplicaStatus]:
        """Each replica's state (also while the server drains: the metrics read it); [] before
        the replicas serve."""
        if not self._attached:
            return []
        return [
            ReplicaStatus(
                state=engine.scheduler.status(),
                forward_passes=engine.num_forward_passes,
                embed_forward_passes=engine.num_embed_forward_passes,
                healthy=engine.healthy,
                restarts=supervisor.restarts,
            )
            for engine, supervisor in zip(self.engines, self.supervisors)
        ]

    def check_ready(self) -> None:
        """Raises RequestError(UNAVAILABLE) while the model loads or the server drains."""
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, None, "the server is shutting down")
        if not self._attached:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, None, "the model is still loading", retry_delay_s=LOADING_RETRY_DELAY_S)

    def _queue_load(self) -> QueueLoad:
        statuses = [engine.scheduler.status() for engine in self.engines]
        return QueueLoad(
            requests=sum(s.waiting for s in statuses) + self.batcher.num_queued_requests,
            tokens=sum(s.waiting_tokens for s in statuses) + self.batcher.num_queued_tokens,
        )
