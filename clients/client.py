"""Blocking Python client of the shardgate Inference API (needs only grpcio and protobuf).

    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_new_tokens=16).text)
        print(client.chat([{"role": "user", "content": "Hi!"}]).text)

Every failed call raises a `ShardgateError` subclass (see errors.py); `timeout` is the deadline
in seconds of each call (the client's default, or per call), shared by its retries.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardgate.clients.connection import NO_RETRY, TLS, Retry, call_metadata, channel_options
from shardgate.clients.errors import ShardgateError, from_rpc_error
from shardgate.clients.messages import Message, bidi_cancel, bidi_generate, build_embed_request, build_request, build_tokenize_request
from shardgate.clients.results import Completion, Delta, Embeddings, ModelInfo, RequestFailed, Usage, bidi_event
from shardgate.proto import inference_pb2, inference_pb2_grpc

__all__ = [
    "Client",
    "BidiStream",
    "ShardgateError",
    "Completion",
    "Delta",
    "Embeddings",
    "ModelInfo",
    "RequestFailed",
    "Usage",
    "build_request",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
CLIENT_TIMEOUT = object()
"""Default of each call's `timeout`: use the client's."""


def make_channel(module, address: str, tls: TLS | bool | None, max_message_bytes: int, retry: Retry):
    """A channel of `module` (grpc or grpc.aio) that retries by `retry`: TLS when tls is a TLS
    or True (system roots)."""
    tls = TLS() if tls is True else (tls or None)
    options = channel_options(tls, max_message_bytes, retry)
    if tls is None:
        return module.insecure_channel(address, options=options)
    return module.secure_channel(address, tls.credentials(), options=options)


class Client:
    """Blocking client. `retry` (off by default) re-sends calls that failed with UNAVAILABLE or
    RESOURCE_EXHAUSTED before any token arrived; `tls` (a TLS, or True for the system's roots)
    and `token` (sent as `authorization: Bearer ...`) authenticate to a server that asks."""

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
        self._channel = make_channel(grpc, address, tls, max_message_bytes, self.retry)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _timeout(self, timeout) -> float | None:
        """The deadline of one call, all its attempts included."""
        return self.timeout if timeout is CLIENT_TIMEOUT else timeout

    def _unary(self, rpc, request, timeout, traceparent: str | None = None):
        try:
            return rpc(request, timeout=self._timeout(timeout), metadata=call_metadata(self.token, traceparent))
        except grpc.RpcError as raw:
            raise from_rpc_error(raw) from None

    def generate(self, prompt: str | list[int], *, timeout=CLIENT_TIMEOUT, traceparent: str | None = None, **params) -> Completion:
        """The whole completion; params are build_request's (max_new_tokens, temperature, ...).
        `traceparent` puts the call in that trace instead of the current OpenTelemetry context."""
        return self._generate(build_request(prompt, **params), timeout, traceparent)

    def stream(self, prompt: str | list[int], *, timeout=CLIENT_TIMEOUT, traceparent: str | None = None, **params) -> Iterator[Delta]:
        """Token deltas as they are generated; the last carries finish_reason and usage.
        Stopping the iteration early cancels the generation on the server."""
        return self._stream(build_request(prompt, **params), timeout, traceparent)

    def chat(
        self, messages: Sequence[Message], *, stream: bool = False, timeout=CLIENT_TIMEOUT, traceparent: str | None = None, **params
    ) -> Completion | Iterator[Delta]:
        """The model's reply to a conversation (dicts {"role", "content"} or (role, content)
        pairs, oldest first), rendered with the model's chat template on the server: the whole
        Completion, or with stream=True its Deltas as `stream` gives them. params as generate's."""
        request = build_request(messages=messages, **params)
        return self._stream(request, timeout, traceparent) if stream else self._generate(request, timeout, traceparent)

    def _generate(self, request: inference_pb2.GenerateRequest, timeout, traceparent: str | None) -> Completion:
        return Completion.from_proto(self._unary(self._stub.Generate, request, timeout, traceparent))

    def _stream(self, request: inference_pb2.GenerateRequest, timeout, traceparent: str | None) -> Iterator[Delta]:
        call = self._stub.GenerateStream(request, timeout=self._timeout(timeout), metadata=call_metadata(self.token, traceparent))
        try:
            for message in call:
                yield Delta.from_proto(message)
        except grpc.RpcError as raw:
            raise from_rpc_error(raw) from None
        finally:
            call.cancel()

    def embed(self, inputs: str | list[str], *, timeout=CLIENT_TIMEOUT, **params) -> Embeddings:
        """One vector per input; params: pooling ("mean" or "last"), normalize, priority, timeout_ms."""
        return Embeddings.from_proto(self._unary(self._stub.Embed, build_embed_request(inputs, **params), timeout))

    def bidi(self, *, timeout=CLIENT_TIMEOUT) -> BidiStream:
        """A multiplexed stream: start and cancel many generations on one call (never retried)."""
        return BidiStream(self._stub, self._timeout(timeout), call_metadata(self.token))

    def tokenize(self, text: str | Sequence[Message], add_special_tokens: bool = False, *, timeout=CLIENT_TIMEOUT) -> list[int]:
        """Token ids of a text, or of chat messages as a chat request's prompt."""
        return list(self._unary(self._stub.Tokenize, build_tokenize_request(text, add_special_tokens), timeout).token_ids)

    def server_status(self, *, timeout=CLIENT_TIMEOUT) -> inference_pb2.ServerStatusResponse:
        """Live state: queue, active requests, and per replica KV blocks, running, health."""
        return self._unary(self._stub.ServerStatus, inference_pb2.ServerStatusRequest(), timeout)

    def model_info(self, *, timeout=CLIENT_TIMEOUT) -> ModelInfo:
        return self._unary(self._stub.ModelInfo, inference_pb2.ModelInfoRequest(), timeout)

    def health(self, service: str = "", *, timeout=CLIENT_TIMEOUT) -> str:
        """grpc.health.v1 status of `service` ("" = the whole server): SERVING, NOT_SERVING, ..."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_END = None


class BidiStream:
    """One GenerateBidi call: `generate` and `cancel` send, iterating receives every request's
    `Delta`s (tagged by request_id, interleaved) and a `RequestFailed` for each request that
    failed. `done_writing` says no more requests will come; the stream then ends once they
    all have."""

    def __init__(self, stub: inference_pb2_grpc.InferenceStub, timeout: float | None, metadata) -> None:
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.GenerateBidi(iter(self._outbox.get, _END), timeout=timeout, metadata=metadata)

    def generate(self, request_id: str, prompt: str | list[int], **params) -> None:
        self._outbox.put(bidi_generate(request_id, prompt, **params))

    def cancel(self, request_id: str) -> None:
        self._outbox.put(bidi_cancel(request_id))

    def done_writing(self) -> None:
        self._outbox.put(_END)

    def __iter__(self) -> Iterator[Delta | RequestFailed]:
        try:
            for message in self._call:
                yield bidi_event(message)
        except grpc.RpcError as raw:
            raise from_rpc_error(raw) from None

    def close(self) -> None:
        """Ends the call now (pending requests are cancelled on the server)."""
        self._outbox.put(_END)
        self._call.cancel()

    def __enter__(self) -> BidiStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
