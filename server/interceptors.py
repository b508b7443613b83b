"""Server interceptors: authentication, and hygiene (no traceback or path leaves the server)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable

import grpc
from google.protobuf.message import DecodeError

from shardgate.server.rich_status import abort
from shardgate.server.tenancy import TENANT, ApiKeys
from shardgate.server.validation import invalid

log = logging.getLogger("shardgate.server")


def _handler_kind(handler: grpc.RpcMethodHandler) -> str:
    return ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")


def _rebuild(handler: grpc.RpcMethodHandler, behaviour: Callable, deserializer: Callable | None) -> grpc.RpcMethodHandler:
    kind = _handler_kind(handler)
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behaviour, request_deserializer=deserializer, response_serializer=handler.response_serializer)


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can answer
    INVALID_ARGUMENT instead of gRPC's generic failure."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` with one of the configured keys on every method
    except the exempt services (health); keys are compared in constant time (tenancy.ApiKeys). The handler of an
    authorized call runs with its key's tenant id current (tenancy.TENANT)."""

    def __init__(self, keys: ApiKeys, exempt_services: Iterable[str]) -> None:
        self.keys = keys
        self._exempt = tuple(f"/{service}/" for service in exempt_services)

    def tenant(self, metadata: tuple) -> str | None:
        """The tenant id of the call's key; None when it has no valid key."""
        values = [value for key, value in metadata or () if key == "authorization"]
        return self.keys.tenant(values[0]) if len(values) == 1 else None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        tenant = self.tenant(handler_call_details.invocation_metadata)
        if tenant is not None:
            return _rebuild(handler, _as_tenant(handler, tenant), handler.request_deserializer)
        return _rebuild(handler, _refusal(handler), handler.request_deserializer)


def _as_tenant(handler: grpc.RpcMethodHandler, tenant: str) -> Callable:
    """The handler's behaviour, run with `tenant` current (and the tasks it starts, which copy the context)."""
    behaviour = getattr(handler, _handler_kind(handler))
    if handler.response_streaming:

        async def stream_as_tenant(request, context):
            TENANT.set(tenant)
            responses = behaviour(request, context)
            if hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            else:  # a handler that writes with context.write()
                await responses

        return stream_as_tenant

    async def as_tenant(request, context):
        TENANT.set(tenant)
        return await behaviour(request, context)

    return as_tenant


def _refusal(handler: grpc.RpcMethodHandler) -> Callable:
    message = "missing or invalid API key (send authorization: Bearer <key>)"
    if handler.response_streaming:

        async def refuse_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # an async generator, like the handler it replaces

        return refuse_stream

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return refuse


class HygieneInterceptor(grpc.aio.ServerInterceptor):
    """Turns an unparseable request into INVALID_ARGUMENT and an unexpected exception into
    INTERNAL with a short message and an error id; the details go to the log, never to the caller."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        behaviour = getattr(handler, _handler_kind(handler))
        deserializer = _tolerant(handler.request_deserializer) if handler.request_deserializer else None
        if handler.response_streaming:

            async def guarded_stream(request, context):
                request = await _checked(request, context, handler.request_streaming)
                try:
                    responses = behaviour(request, context)
                    if hasattr(responses, "__aiter__"):
                        async for response in responses:
                            yield response
                    else:  # a handler that writes with context.write() (e.g. health's Watch)
                        await responses
                except Exception as error:  # noqa: BLE001 - this is the last line of defence
                    await _internal(error, method, context)

            return _rebuild(handler, guarded_stream, deserializer)

        async def guarded(request, context):
            request = await _checked(request, context, handler.request_streaming)
            try:
                return await behaviour(request, context)
            except Exception as error:  # noqa: BLE001
                await _internal(error, method, context)

        return _rebuild(handler, guarded, deserializer)


def _tolerant(deserialize: Callable) -> Callable:
    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as error:
            return _Malformed(error)

    return parse


async def _checked(request, context, streaming: bool):
    """The request, or an INVALID_ARGUMENT abort if it did not parse; a request stream yields
    parsed messages and aborts at the first bad one."""
    if streaming:
        return _checked_stream(request, context)
    if isinstance(request, _Malformed):
        await abort(context, _MALFORMED)
    return request


_MALFORMED = invalid("request", "not a valid message (string fields must be UTF-8)")


async def _checked_stream(requests, context):
    async for request in requests:
        if isinstance(request, _Malformed):
            await abort(context, _MALFORMED)
        yield request


async def _internal(error: Exception, method: str, context) -> None:
    if isinstance(error, grpc.aio.AbortError):  # an abort the handler chose: let it through
        raise error
    error_id = secrets.token_hex(6)
    log.exception("error %s in %s", error_id, method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); the server log has the details")
