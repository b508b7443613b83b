"""The bench's protocol drivers: one greedy streamed request at a time, over the native gRPC
API, the OpenAI-compatible HTTP API, or (protocol_kserve.py) KServe v2, so `shardgate bench
--protocol native,openai,...` measures each protocol's cost against the native path.

A driver is built as `Driver(address, client_options)` (client_options: the connection flags,
as AsyncClient takes them), used as `async with`, and streams with `stream(item, ignore_eos)`.
Adding a protocol is one line in PROTOCOLS.
"""

from __future__ import annotations

import importlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from shardgate.clients.errors import ShardgateError, error_for
from shardgate.clients.tools.workload import WorkItem


class StreamDriver(Protocol):
    async def __aenter__(self) -> StreamDriver: ...

    async def __aexit__(self, *exc) -> None: ...

    def stream(self, item: WorkItem, ignore_eos: bool) -> AsyncIterator[int]:
        """One greedy streamed request (its text prompt when the item has one, else its token
        ids); yields the number of new tokens each received message carries. Raises a
        ShardgateError (its status code names the failure) when the request fails."""


GRPC = "grpc"
HTTP = "http"


@dataclass(frozen=True)
class ProtocolSpec:
    driver: str
    """`module:Class` of its driver (imported only when the protocol is run)."""
    port: str
    """Which of the server's ports it speaks to: GRPC (--addr) or HTTP (--http-addr)."""

    def load(self) -> Callable[[str, dict], StreamDriver]:
        module, _, name = self.driver.partition(":")
        return getattr(importlib.import_module(module), name)


PROTOCOLS = {
    "native": ProtocolSpec("shardgate.clients.tools.protocols:NativeDriver", GRPC),
    "openai": ProtocolSpec("shardgate.clients.tools.protocols:OpenAIDriver", HTTP),
    "kserve": ProtocolSpec("shardgate.clients.tools.protocol_kserve:KServeDriver", GRPC),
}
NATIVE = "native"


class NativeDriver:
    """shardgate.v1.Inference GenerateStream through the async client library."""

    def __init__(self, address: str, client_options: dict) -> None:
        from shardgate.clients.async_client import AsyncClient

        self._client = AsyncClient(address, **client_options)

    async def __aenter__(self) -> NativeDriver:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.__aexit__(*exc)

    async def stream(self, item: WorkItem, ignore_eos: bool) -> AsyncIterator[int]:
        prompt = item.prompt_ids if item.prompt_text is None else item.prompt_text
        async for delta in self._client.stream(prompt, max_new_tokens=item.max_new_tokens, temperature=0, ignore_eos=ignore_eos):
            if delta.token_ids:
                yield len(delta.token_ids)


_HTTP_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class OpenAIDriver:
    """/v1/completions streamed over SSE through the `openai` SDK's AsyncOpenAI: what the
    protocol costs a real OpenAI client (HTTP, SSE parsing, the SDK's chunk objects) is in the
    numbers, as it would be for the teams that use it.

    Tokens per chunk: each chunk's `token_ids` (the `return_token_ids` extension) when the
    server sends them, else one per chunk (with ignore_eos a step makes one token per request);
    tokens the final usage counts beyond those are yielded at the end."""

    def __init__(self, address: str, client_options: dict) -> None:
        import openai

        tls = client_options.get("tls")
        http_client = None
        if tls is not None:
            http_client = openai.DefaultAsyncHttpxClient(verify=_ssl_context(tls))
        retry = client_options.get("retry")
        self._openai = openai
        self._client = openai.AsyncOpenAI(
            base_url=f"{'https' if tls is not None else 'http'}://{address}/v1",
            api_key=client_options.get("token") or "none",
            timeout=client_options.get("timeout"),
            max_retries=0 if retry is None else retry.attempts - 1,
            http_client=http_client,
        )
        self._model = ""

    async def __aenter__(self) -> OpenAIDriver:
        models = await self._call(self._client.models.list())
        self._model = models.data[0].id
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.close()

    async def _call(self, awaitable):
        try:
            return await awaitable
        except self._openai.APIError as error:
            raise _error(self._openai, error) from None

    async def stream(self, item: WorkItem, ignore_eos: bool) -> AsyncIterator[int]:
        if item.prompt_text is None:
            raise ValueError("the openai protocol sends text prompts: build the workload with text_workload")
        stream = await self._call(
            self._client.completions.create(
                model=self._model,
                prompt=item.prompt_text,
                max_tokens=item.max_new_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": ignore_eos, "return_token_ids": True},
            )
        )
        counted, total = 0, None
        try:
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        total = chunk.usage.completion_tokens
                    if chunk.choices:
                        token_ids = getattr(chunk.choices[0], "token_ids", None)
                        count = len(token_ids) if token_ids is not None else 1
                        if count:
                            counted += count
                            yield count
        except self._openai.APIError as error:
            raise _error(self._openai, error) from None
        if total is not None and total > counted:
            yield total - counted


def _error(openai, error) -> ShardgateError:
    """An OpenAI SDK error as the status code the bench records."""
    if isinstance(error, openai.APITimeoutError):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif isinstance(error, openai.APIConnectionError):
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(error, openai.APIStatusError):
        code = _HTTP_CODES.get(error.status_code, grpc.StatusCode.INTERNAL)
    else:  # an error event inside a stream
        code = grpc.StatusCode.INTERNAL
    return error_for(code, str(error))


def _ssl_context(tls) -> ssl.SSLContext:
    """An HTTPS context from the bench's TLS flags (file paths or PEM bytes)."""

    def text(value) -> str | None:
        if value is None or isinstance(value, bytes):
            return None if value is None else value.decode()
        return Path(value).read_text()

    context = ssl.create_default_context(cadata=text(tls.root_certificates)) if tls.root_certificates else ssl.create_default_context()
    if tls.certificate_chain is not None:
        if isinstance(tls.certificate_chain, bytes) or isinstance(tls.private_key, bytes):
            raise ValueError("the openai protocol takes the client certificate and key as files")
        context.load_cert_chain(tls.certificate_chain, tls.private_key)
    if tls.server_name is not None:
        raise ValueError("the openai protocol checks the certificate against --http-addr's host; --server-name is not supported")
    return context
