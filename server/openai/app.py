"""The OpenAI-compatible HTTP API: Starlette routes over the engine API, served by uvicorn on
the gateway's event loop (one engine, admission budget, set of keys and telemetry for every
protocol).

Routes: GET /health (no key needed: 200 while serving, 503 while loading, draining or without a
replica), GET /v1/models, GET /v1/models/{model}, POST /v1/completions, /v1/chat/completions,
/v1/embeddings. Every error is an OpenAI error object (errors.py). A stream that fails after
its first event ends with one `data: {"error": {...}}` event and no `[DONE]` (the OpenAI SDK
raises it as an APIError).

Deadlines: `timeout_ms` in the body, and the OpenAI SDK's `X-Stainless-Timeout` header (its
client timeout, in seconds): whichever ends first; past it the call gets 504 (or the error
event, once streaming). A client that goes away (stream or not) aborts its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import Any

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from shardgate.proto import inference_pb2
from shardgate.server.config import GatewayConfig
from shardgate.server.engine_api import EngineAPI, Generation
from shardgate.server.openai import responses, schemas
from shardgate.server.openai.choices import interleaved
from shardgate.server.openai.errors import OpenAIError, from_request_error, invalid_param
from shardgate.server.tenancy import TENANT, ApiKeys, current_tenant
from shardgate.server.validation import RequestError

log = logging.getLogger("shardgate.server")
PROTOCOL = "openai"
TIMEOUT_HEADER = "x-stainless-timeout"
_NO_KEY = "missing or invalid API key (send Authorization: Bearer <key>)"


class _ClientGone(Exception):
    """The client closed its connection before the response was ready."""


class _Stream(EventSourceResponse):
    """An SSE response that aborts its generations however it ends (even if the client left
    before the first event, when the event generator never starts)."""

    def __init__(self, events, generations: list[Generation]) -> None:
        super().__init__(events, sep="\n")
        self._generations = generations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generation in self._generations:
                generation.abort()


class OpenAIFrontend:
    def __init__(self, api: EngineAPI, config: GatewayConfig, keys: ApiKeys | None) -> None:
        self.api = api
        self.config = config
        self.keys = keys
        self.created = int(time.time())
        self._info: inference_pb2.ModelInfoResponse | None = None

    def asgi_app(self) -> Callable:
        routes = [
            Route("/health", self.health),
            Route("/v1/models", self._endpoint(self.models)),
            Route("/v1/models/{model:path}", self._endpoint(self.model)),
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint(self.chat_completions), methods=["POST"]),
            Route("/v1/embeddings", self._endpoint(self.embeddings), methods=["POST"]),
        ]
        handlers = {OpenAIError: _error_response, HTTPException: _http_error, _ClientGone: _client_gone, Exception: _internal_error}
        app = Starlette(routes=routes, exception_handlers=handlers)
        telemetry = self.api.telemetry
        if not telemetry.tracing:
            return app
        # The server span of each call, joined to the caller's trace by its traceparent header;
        # the engine API's spans (and the GenAI attributes) hang under it, as under gRPC's.
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        return OpenTelemetryMiddleware(app, tracer_provider=telemetry.tracer_provider, exclude_spans=["receive", "send"])

    def _endpoint(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """The handler behind the API-key check, with the engine API's refusals as OpenAI errors."""

        async def endpoint(request: Request) -> Response:
            tenant = None
            if self.keys is not None:
                values = request.headers.getlist("authorization")
                tenant = self.keys.tenant(values[0]) if len(values) == 1 else None
                if tenant is None:
                    raise OpenAIError(
                        401,
                        "missing or invalid API key (send Authorization: Bearer <key>)",
                        "invalid_request_error",
                        None,
                        "invalid_api_key",
                    )
            token = TENANT.set(tenant)  # as the gRPC AuthInterceptor does: the key's tenant for the engine API
            try:
                return await handler(request)
            except RequestError as error:
                raise from_request_error(error) from None
            finally:
                TENANT.reset(token)

        return endpoint

    # --- routes -------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        serving = self.api.serving and not self.api.draining
        return JSONResponse({"status": "serving" if serving else "not serving"}, status_code=200 if serving else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse(responses.models(self._model_info().model, self.created))

    async def model(self, request: Request) -> Response:
        return JSONResponse(responses.model_object(self._served(request.path_params["model"], "model"), self.created))

    async def completions(self, request: Request) -> Response:
        body: schemas.CompletionRequest = schemas.parse(schemas.CompletionRequest, await self._json(request))
        model = self._served(body.model)
        plan = schemas.completion_plan(body, self.config.http.max_choices)
        writer = responses.Writer("completion", model, self.api.tokenizer, body.logprobs is not None, body.return_token_ids)
        return await self._respond(request, body, plan, writer)

    async def chat_completions(self, request: Request) -> Response:
        body: schemas.ChatRequest = schemas.parse(schemas.ChatRequest, await self._json(request))
        model = self._served(body.model)
        max_tokens = body.requested_max_tokens
        if max_tokens is None:
            max_tokens = await self._room_after(body)
        plan = schemas.chat_plan(body, self.config.http.max_choices, max_tokens)
        writer = responses.Writer("chat", model, self.api.tokenizer, body.logprobs, body.return_token_ids)
        return await self._respond(request, body, plan, writer)

    async def embeddings(self, request: Request) -> Response:
        body: schemas.EmbeddingRequest = schemas.parse(schemas.EmbeddingRequest, await self._json(request))
        model = self._served(body.model)
        message = body.embed_request(self._model_info().hidden_size)
        try:
            result = await _unless_disconnected(
                request, self.api.embed(message, _deadline(request), protocol=PROTOCOL, tenant=current_tenant())
            )
        except RequestError as error:
            raise from_request_error(error, {"inputs": "input"}) from None
        return JSONResponse(responses.embeddings(model, result.vectors, result.prompt_tokens, body.encoding_format))

    # --- generation ---------------------------------------------------------------------

    async def _respond(self, request: Request, body, plan: schemas.ChoicePlan, writer: responses.Writer) -> Response:
        generations = await self._start(plan, _deadline(request))
        if body.stream:
            return _Stream(self._events(generations, plan, writer, body.include_usage), generations)
        choices = [responses.Choice() for _ in generations]

        async def collect() -> None:
            async with aclosing(interleaved(generations)) as outputs:
                async for index, output in outputs:
                    choices[index].add(output)

        try:
            await _unless_disconnected(request, collect())
        except RequestError as error:
            raise from_request_error(error, plan.renames) from None
        finally:
            for generation in generations:
                generation.abort()
        return JSONResponse(writer.response(choices, plan.prompt_of_choice))

    async def _start(self, plan: schemas.ChoicePlan, deadline: float | None) -> list[Generation]:
        """Submits every choice's request, or none: a refusal (or the caller going away while
        the prompts are tokenized) aborts those already started."""
        generations: list[Generation] = []
        try:
            for message in plan.requests:
                generations.append(await self.api.generate(message, deadline, protocol=PROTOCOL, tenant=current_tenant()))
        except BaseException as error:
            for generation in generations:
                generation.abort()
            if isinstance(error, RequestError):
                raise from_request_error(error, plan.renames) from None
            raise
        return generations

    async def _events(self, generations: list[Generation], plan: schemas.ChoicePlan, writer: responses.Writer, include_usage: bool):
        """The SSE data of a stream: a chunk per output, the usage chunk when asked, [DONE]."""
        choices = [responses.Choice() for _ in generations]
        try:
            async with aclosing(interleaved(generations)) as outputs:
                async for index, output in outputs:
                    if output.usage is not None:
                        choices[index].usage = output.usage
                    yield writer.chunk(index, output, include_usage)
        except RequestError as error:
            yield responses.error_event(from_request_error(error, plan.renames))
            return
        except Exception as error:  # noqa: BLE001 - the stream still ends with an error, not a cut
            yield responses.error_event(_internal(error, "stream"))
            return
        if include_usage:
            yield writer.usage_chunk(choices, plan.prompt_of_choice)
        yield "[DONE]"

    # --- request parts ------------------------------------------------------------------

    def _model_info(self) -> inference_pb2.ModelInfoResponse:
        """The served model (503 while it loads or the server drains)."""
        self.api.check_ready()
        if self._info is None:
            self._info = self.api.describe()
        return self._info

    def _served(self, model: str, param: str = "model") -> str:
        """The served model's name, if `model` names it; else 404 model_not_found."""
        served = self._model_info().model
        if model != served:
            raise OpenAIError(
                404,
                f"{param}: the model {model!r} does not exist; this server serves {served!r}",
                "invalid_request_error",
                param,
                "model_not_found",
            )
        return served

    async def _room_after(self, body: schemas.ChatRequest) -> int:
        """The max_tokens of a chat request that sets none: all the context its prompt leaves
        (at least 1; validation then refuses a prompt that leaves none)."""
        try:
            prompt = await self.api.tokenize(inference_pb2.TokenizeRequest(messages=body.chat_messages()), tenant=current_tenant())
        except RequestError as error:
            raise from_request_error(error) from None
        return max(1, min(self.config.max_new_tokens_limit, self.api.limits.max_context_tokens - len(prompt.token_ids)))

    async def _json(self, request: Request) -> Any:
        limit = self.config.max_message_bytes
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise OpenAIError(413, f"the request body is larger than {limit} bytes (--max-message-bytes)", "invalid_request_error")
        try:
            return await self.api.tokenizer_pool.run(partial(json.loads, bytes(data)))  # a big body parses off the event loop
        except ValueError:
            raise invalid_param(None, "the request body is not valid JSON") from None


def _deadline(request: Request) -> float | None:
    """The OpenAI SDK's client timeout (X-Stainless-Timeout, seconds) as time.monotonic()."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise invalid_param(None, f"the {TIMEOUT_HEADER} header must be a positive number of seconds, got {value!r}")
    return time.monotonic() + seconds


async def _unless_disconnected(request: Request, work: Awaitable) -> Any:
    """The result of `work`, unless the client goes away first: then `work` is cancelled (its
    requests abort) and _ClientGone is raised."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise _ClientGone()
    return task.result()


async def _error_response(request: Request, error: OpenAIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


async def _http_error(request: Request, error: HTTPException) -> Response:
    code = "not_found" if error.status_code == 404 else None
    return await _error_response(
        request, OpenAIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", "invalid_request_error", None, code)
    )


async def _client_gone(request: Request, error: _ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it


def _internal(error: Exception, where: str) -> OpenAIError:
    """No traceback or path leaves the server: the caller gets an error id, the log the details."""
    error_id = secrets.token_hex(6)
    log.error("error %s in %s", error_id, where, exc_info=error)
    return OpenAIError(500, f"internal error (id {error_id}); the server log has the details", "server_error")


async def _internal_error(request: Request, error: Exception) -> Response:
    return await _error_response(request, _internal(error, f"{request.method} {request.url.path}"))


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket created with proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on
    connections of such sockets, and without it each small SSE write can wait for the client's
    delayed ACK (~40 ms a chunk)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """The gateway owns SIGINT/SIGTERM (it drains first): uvicorn must not take them."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The frontend's uvicorn server, running as a task on the gateway's loop."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    @classmethod
    def start(cls, api: EngineAPI, config: GatewayConfig, keys: ApiKeys | None) -> HttpServer:
        """Binds --host:--http-port (a RuntimeError in one line if it cannot) and serves,
        checking `keys` (the gRPC API's) when there are any."""
        security = config.security
        app = OpenAIFrontend(api, config, keys).asgi_app()
        try:
            sock = _listen(config.host, config.http.port)
        except OSError as error:
            raise RuntimeError(f"cannot serve HTTP on {config.host}:{config.http.port}: {error.strerror or error}") from None
        uv_config = uvicorn.Config(
            app,
            log_config=None,  # the gateway's logging stays as it is
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            ssl_certfile=security.tls_cert,
            ssl_keyfile=security.tls_key,
            ssl_ca_certs=security.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if security.tls_client_ca else ssl.CERT_NONE,
        )
        server = _Server(uv_config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="http server")
        return cls(server, task, sock.getsockname()[1])

    async def stop(self) -> None:
        """Stops accepting, gives open calls a second, then ends them."""
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
