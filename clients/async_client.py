"""asyncio Python client of the shardgate Inference API (grpc.aio); the same calls as Client.

async with AsyncClient("127.0.0.1:50051") as client:
    async for delta in client.stream("Hello", max_new_tokens=16):
        print(delta.text, end="")
    print((await client.chat([("user", "Hi!")])).text)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardgate.clients.client import CLIENT_TIMEOUT, DEFAULT_MAX_MESSAGE_BYTES, make_channel
from shardgate.clients.connection import NO_RETRY, TLS, Retry, call_metadata
from shardgate.clients.errors import from_rpc_error
from shardgate.clients.messages import Message, bidi_cancel, bidi_generate, build_embed_request, build_request, build_tokenize_request
from shardgate.clients.results import Completion, Delta, Embeddings, ModelInfo, RequestFailed, bidi_event
from shardgate.proto import inference_pb2, inference_pb2_grpc


class AsyncClient:
    """asyncio client; the same options as Client. Create and use it inside one event loop."""

    def __init__(
        self,
        address: str,
        timeout: float | None = None,
        *,
        retry: Retry | None = None,
        tls: TLS | bool | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.timeout = timeout
        self.retry = retry or NO_RETRY
        self.token = token
        self._channel = make_channel(grpc.aio, address, tls, max_message_bytes, self.retry)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _timeout(self, timeout) -> float | None:
        """The deadline of one call, all its attempts included."""
        return self.timeout if timeout is CLIENT_TIMEOUT else timeout

    async def _unary(self, rpc, request, timeout, traceparent: str | None = None):
        try:
            return await rpc(request, timeout=self._timeout(timeout), metadata=call_metadata(self.token, traceparent))
        except grpc.RpcError as raw:
            raise from_rpc_error(raw) from None

    async def generate(self, prompt: str | list[int], *, timeout=CLIENT_TIMEOUT, traceparent: str | None = None, **params) -> Completion:
        return await self._generate(build_request(prompt, **params), timeout, traceparent)

    def stream(self, prompt: str | list[int], *, timeout=CLIENT_TIMEOUT, traceparent: str | None = None, **params) -> AsyncIterator[Delta]:
        """Token deltas as they are generated; cancelling the consuming task cancels the generation."""
        return self._stream(build_request(prompt, **params), timeout, traceparent)

    def chat(
        self, messages: Sequence[Message], *, stream: bool = False, timeout=CLIENT_TIMEOUT, traceparent: str | None = None, **params
    ) -> Awaitable[Completion] | AsyncIterator[Delta]:
        """As Client.chat: `await client.chat(messages)` is the Completion; with stream=True,
        `async for delta in client.chat(messages, stream=True)` the Deltas."""
        request = build_request(messages=messages, **params)
        return self._stream(request, timeout, traceparent) if stream else self._generate(request, timeout, traceparent)

    async def _generate(self, request: inference_pb2.GenerateRequest, timeout, traceparent: str | None) -> Completion:
        return Completion.from_proto(await self._unary(self._stub.Generate, request, timeout, traceparent))

    async def _stream(self, request: inference_pb2.GenerateRequest, timeout, traceparent: str | None) -> AsyncIterator[Delta]:
        call = self._stub.GenerateStream(request, timeout=self._timeout(timeout), metadata=call_metadata(self.token, traceparent))
        try:
            async for message in call:
                yield Delta.from_proto(message)
        except grpc.RpcError as raw:
            raise from_rpc_error(raw) from None
        finally:
            call.cancel()

    async def embed(self, inputs: str | list[str], *, timeout=CLIENT_TIMEOUT, **params) -> Embeddings:
        return Embeddings.from_proto(await self._unary(self._stub.Embed, build_embed_request(inputs, **params), timeout))

    def bidi(self, *, timeout=CLIENT_TIMEOUT) -> AsyncBidiStream:
        """A multiplexed stream: start and cancel many generations on one call (never retried)."""
        return AsyncBidiStream(self._stub.GenerateBidi(timeout=self._timeout(timeout), metadata=call_metadata(self.token)))

    async def tokenize(self, text: str | Sequence[Message], add_special_tokens: bool = False, *, timeout=CLIENT_TIMEOUT) -> list[int]:
        """Token ids of a text, or of chat messages as a chat request's prompt."""
        return list((await self._unary(self._stub.Tokenize, build_tokenize_request(text, add_special_tokens), timeout)).token_ids)

    async def server_status(self, *, timeout=CLIENT_TIMEOUT) -> inference_pb2.ServerStatusResponse:
        """Live state: queue, active requests, and per replica KV blocks, running, health."""
        return await self._unary(self._stub.ServerStatus, inference_pb2.ServerStatusRequest(), timeout)

    async def model_info(self, *, timeout=CLIENT_TIMEOUT) -> ModelInfo:
        return await self._unary(self._stub.ModelInfo, inference_pb2.ModelInfoRequest(), timeout)

    async def health(self, service: str = "", *, timeout=CLIENT_TIMEOUT) -> str:
        response = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncBidiStream:
    """One GenerateBidi call (see client.BidiStream): await `generate`/`cancel`/`done_writing`,
    `async for` the events."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call

    async def generate(self, request_id: str, prompt: str | list[int], **params) -> None:
        await self._write(bidi_generate(request_id, prompt, **params))

    async def cancel(self, request_id: str) -> None:
        await self._write(bidi_cancel(request_id))

    async def done_writing(self) -> None:
        await self._call.done_writing()

    async def _write(self, message: inference_pb2.GenerateBidiRequest) -> None:
        try:
            await self._call.write(message)
        except grpc.RpcError as raw:
            raise from_rpc_error(raw) from None

    async def __aiter__(self) -> AsyncIterator[Delta | RequestFailed]:
        try:
            async for message in self._call:
                yield bidi_event(message)
        except grpc.RpcError as raw:
            raise from_rpc_error(raw) from None

    async def close(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncBidiStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
