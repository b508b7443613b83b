"""gRPC handlers of the public Inference service: thin adapters from protobuf to the engine
API (engine_api.py) and back."""

from __future__ import annotations

import array
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial

import grpc

from shardgate.proto import inference_pb2, inference_pb2_grpc
from shardgate.server.engine_api import EngineAPI, GenerateOutput, Generation, Tokenized, Usage
from shardgate.server.request import FinishReason
from shardgate.server.rich_status import abort, error_details
from shardgate.server.tenancy import current_tenant
from shardgate.server.validation import RequestError, invalid

_FINISH_REASONS = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: inference_pb2.FINISH_REASON_EOS,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}


def _usage(usage: Usage) -> inference_pb2.Usage:
    return inference_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        resumes=usage.resumes,
        queue_time_s=usage.queue_time_s,
        time_to_first_token_s=usage.time_to_first_token_s,
        replica=usage.replica,
        device_seconds=usage.device_seconds,
        cost=usage.cost,
    )


def _stream_message(output: GenerateOutput) -> inference_pb2.GenerateStreamResponse:
    message = inference_pb2.GenerateStreamResponse(
        request_id=output.request_id, text=output.text, token_ids=output.token_ids, logprobs=output.logprobs
    )
    if output.finish_reason is not None:
        message.finish_reason = _FINISH_REASONS[output.finish_reason]
        message.usage.CopyFrom(_usage(output.usage))
    return message


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline, as time.monotonic()."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _vector(data: bytes) -> array.array:
    """Little-endian float32 bytes as an array of floats."""
    values = array.array("f")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values


_SLICE = 1 << 16
"""Token ids copied into a response per call: a call holds the GIL, so a long text's response is
built in slices, on a tokenizer thread, and the event loop gets the GIL between them."""


def _tokenize_response(tokenized: Tokenized) -> inference_pb2.TokenizeResponse:
    response = inference_pb2.TokenizeResponse(text=tokenized.text)
    for start in range(0, len(tokenized.token_ids), _SLICE):
        response.token_ids.extend(tokenized.token_ids[start : start + _SLICE])
        response.tokens.extend(tokenized.tokens[start : start + _SLICE])
    return response


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Every call goes to the engine API; a RequestError becomes the call's status."""

    def __init__(self, api: EngineAPI) -> None:
        self.api = api

    async def _start(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Generation:
        try:
            return await self.api.generate(request, call_deadline(context), tenant=current_tenant())
        except RequestError as error:
            await abort(context, error)

    async def Generate(self, request, context) -> inference_pb2.GenerateResponse:
        generation = await self._start(request, context)
        text, token_ids, logprobs = [], [], []
        try:
            async with aclosing(generation.outputs()) as outputs:
                async for output in outputs:
                    text.append(output.text)
                    token_ids += output.token_ids
                    logprobs += output.logprobs
                    last = output
        except RequestError as error:
            await abort(context, error)
        return inference_pb2.GenerateResponse(
            request_id=last.request_id,
            text="".join(text),
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=_FINISH_REASONS[last.finish_reason],
            usage=_usage(last.usage),
        )

    async def GenerateStream(self, request, context) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        generation = await self._start(request, context)
        try:
            async with aclosing(generation.outputs()) as outputs:
                async for output in outputs:
                    yield _stream_message(output)
        except RequestError as error:
            await abort(context, error)

    async def GenerateBidi(self, request_iterator, context) -> AsyncIterator[inference_pb2.GenerateBidiResponse]:
        """Requests start as their messages arrive; each one's messages go out as they are made.
        The stream ends once the client has half-closed and every request on it has ended;
        if the call itself ends first (cancelled, deadline), every live request is cancelled.

        Backpressure (delivery.py): each request makes its next message only once the transport
        took its previous one, so it holds its admission until its last message is written (or
        its reader stalled past --stream-stall-timeout); its outputs and the stream's error
        messages count against the stream's bound, past which its requests get no steps and no
        new request is read."""
        try:
            self.api.check_ready()  # a stream opened while the engine cannot serve ends at once
        except RequestError as error:
            await abort(context, error)
        tenant = current_tenant()
        outbox = self.api.open_outbox()
        live: dict[str, Generation] = {}
        relays: set[asyncio.Task] = set()

        def fail(request_id: str, error: RequestError) -> None:
            status = inference_pb2.RequestStatus(
                request_id=request_id, code=error.code.value[0], message=str(error), details=error_details(error)
            )
            outbox.put(inference_pb2.GenerateBidiResponse(error=status))

        async def relay(request_id: str, generation: Generation) -> None:
            try:
                async with aclosing(generation.outputs()) as outputs:
                    async for output in outputs:
                        message = inference_pb2.GenerateBidiResponse(message=_stream_message(output))
                        await outbox.send(message, on_stall=generation.release_admission)
            except RequestError as error:
                fail(request_id, error)
            finally:
                del live[request_id]
                outbox.wake()

        async def start(message: inference_pb2.GenerateRequest) -> None:
            """Starts one request; requests start in the order they came (each waits for the
            one before it to be prepared)."""
            request_id = message.request_id
            try:
                if not request_id:
                    raise invalid("request_id", "must be set on a multiplexed stream")
                if request_id in live:
                    raise invalid("request_id", f"{request_id!r} is already live on this stream")
                generation = await self.api.generate(message, call_deadline(context), tenant=tenant, stream=outbox.stream)
            except RequestError as error:
                fail(request_id, error)
                return
            live[request_id] = generation
            task = asyncio.create_task(relay(request_id, generation), name=f"bidi {request_id}")
            relays.add(task)
            task.add_done_callback(relays.discard)

        async def read() -> None:
            async for message in request_iterator:
                action = message.WhichOneof("action")
                if action == "generate":
                    await start(message.generate)
                elif action == "cancel":
                    # Cancelling a finished or unknown request does nothing: it has ended already.
                    generation = live.get(message.cancel.request_id)
                    if generation is not None:
                        self.api.abort(generation)
                else:
                    fail("", invalid("action", "must be generate or cancel"))
                await outbox.stream.room()  # a client that reads nothing cannot make the stream buffer more

        reader = asyncio.create_task(read(), name="bidi reader")
        try:
            async with aclosing(outbox.messages(reader, live)) as messages:
                async for message in messages:
                    yield message  # resumes once the transport took it
        finally:
            reader.cancel()
            for task in list(relays):
                task.cancel()
            for generation in live.values():  # also those whose relay never started
                self.api.abort(generation)

    async def Embed(self, request, context) -> inference_pb2.EmbedResponse:
        try:
            result = await self.api.embed(request, call_deadline(context), tenant=current_tenant())
        except RequestError as error:
            await abort(context, error)
        return inference_pb2.EmbedResponse(
            request_id=result.request_id,
            embeddings=[inference_pb2.Embedding(values=_vector(v), tokens=n) for v, n in zip(result.vectors, result.input_tokens)],
            usage=inference_pb2.Usage(prompt_tokens=result.prompt_tokens, queue_time_s=result.queue_time_s),
        )

    async def ServerStatus(self, request, context) -> inference_pb2.ServerStatusResponse:
        try:
            status = self.api.status()
        except RequestError as error:
            await abort(context, error)
        replicas = [
            inference_pb2.ReplicaStatus(
                total_kv_blocks=replica.state.total_blocks,
                free_kv_blocks=replica.state.free_blocks,
                running_requests=replica.state.running,
                waiting_requests=replica.state.waiting,
                preemptions=replica.state.preemptions,
                forward_passes=replica.forward_passes,
                embed_forward_passes=replica.embed_forward_passes,
                started_requests=replica.state.started,
                healthy=replica.healthy,
                restarts=replica.restarts,
            )
            for replica in status.replicas
        ]
        return inference_pb2.ServerStatusResponse(
            active_requests=status.active_requests,
            queued_requests=status.queued_requests,
            queued_tokens=status.queued_tokens,
            replicas=replicas,
        )

    async def Tokenize(self, request, context) -> inference_pb2.TokenizeResponse:
        try:
            tokenized = await self.api.tokenize(request, tenant=current_tenant())
            return await self.api.tokenizer_pool.run(partial(_tokenize_response, tokenized))
        except RequestError as error:
            await abort(context, error)

    async def ModelInfo(self, request, context) -> inference_pb2.ModelInfoResponse:
        try:
            return self.api.describe()
        except RequestError as error:
            await abort(context, error)
