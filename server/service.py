"""gRPC handlers of the public Inference service: validate, submit, relay events."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from tokenizers import Tokenizer

from shardgate.proto import inference_pb2, inference_pb2_grpc
from shardgate.server.config import GatewayConfig
from shardgate.server.engine import ErrorEvent, FinishEvent, RequestHandle, TokenEvent, usage_times
from shardgate.server.replica import ReplicaInfo
from shardgate.server.request import FinishReason
from shardgate.server.router import Router
from shardgate.server.telemetry import Telemetry
from shardgate.server.validation import ModelLimits, RequestError, validate

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
        queue_time_s=queue,
        time_to_first_token_s=ttft,
        replica=handle.replica,
        device_seconds=request.device_seconds,
        cost=telemetry.cost(request.device_seconds),
    )


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Registered before the model loads (so health can say NOT_SERVING); calls before
    `attach` get UNAVAILABLE."""

    def __init__(self, config: GatewayConfig, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.router: Router | None = None

    def attach(self, router: Router, tokenizer: Tokenizer, infos: list[ReplicaInfo]) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.infos = infos
        self.limits = ModelLimits(
            vocab_size=infos[0].vocab_size,
            max_context_tokens=min(infos[0].max_position_embeddings, *(info.kv_capacity_tokens for info in infos)),
        )

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> None:
        if self.router is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")

    async def _submit(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> RequestHandle:
        await self._require_ready(context)
        try:
            with self.telemetry.tracer.start_as_current_span("validate"):
                valid = validate(request, self.tokenizer, self.limits, self.config)
        except RequestError as error:
            self.telemetry.request_rejected(request.request_id, error.code)
            await context.abort(error.code, str(error))
        handle = self.router.submit(valid)
        call_span = trace.get_current_span().get_span_context()
        if call_span.is_valid:
            handle.request.span_context = call_span
        return handle

    async def _events(self, handle: RequestHandle, context: grpc.aio.ServicerContext):
        """Yields a request's events until its last; cancels it if the caller goes away first."""
        call_span = trace.get_current_span()
        code = grpc.StatusCode.CANCELLED  # unless it ends otherwise: the caller went away
        try:
            while True:
                event = await handle.events.get()
                if isinstance(event, ErrorEvent):
                    code = event.code
                    await context.abort(event.code, event.message)
                if isinstance(event, FinishEvent):
                    code = grpc.StatusCode.OK
                yield event
                if isinstance(event, FinishEvent):
                    return
        finally:
            self.router.cancel(handle)
            self.telemetry.request_finished(handle, code, call_span)

    async def Generate(self, request, context) -> inference_pb2.GenerateResponse:
        handle = await self._submit(request, context)
        text, token_ids, logprobs = [], [], []
        async for event in self._events(handle, context):
            text.append(event.text)
            if isinstance(event, TokenEvent):
                token_ids.append(event.token_id)
                if event.logprob is not None:
                    logprobs.append(event.logprob)
            else:
                reason = event.reason
        return inference_pb2.GenerateResponse(
            request_id=handle.request.request_id,
            text="".join(text),
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=_FINISH_REASONS[reason],
            usage=_usage(handle, self.telemetry),
        )

    async def GenerateStream(self, request, context) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        handle = await self._submit(request, context)
        request_id = handle.request.request_id
        async for event in self._events(handle, context):
            if isinstance(event, TokenEvent):
                yield inference_pb2.GenerateStreamResponse(
                    request_id=request_id,
                    text=event.text,
                    token_ids=[event.token_id],
                    logprobs=[] if event.logprob is None else [event.logprob],
                )
            else:
                yield inference_pb2.GenerateStreamResponse(
                    request_id=request_id,
                    text=event.text,
                    finish_reason=_FINISH_REASONS[event.reason],
                    usage=_usage(handle, self.telemetry),
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
        )
