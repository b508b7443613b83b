"""The driver's side of the gateway link: who may call it (the shared token, when the driver
has one; mutual TLS is the port's own) and which gateway it serves (one session at a time).

A gateway opens its session with Attach and keeps that call open while it uses the replica;
every other call names the session in its metadata. The session ends when the Attach call ends:
the gateway closed its channel, or its connection was lost (reset at once when its process
dies, found by the driver's keepalive pings otherwise), so a restarted gateway can take over."""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Callable

import grpc

from shardgate.proto.link_auth import SESSION_HEADER, TOKEN_HEADER

ATTACH_METHOD = "/shardgate.shard.v1.Shard/Attach"


class SessionGate:
    """The driver's one gateway session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: str | None = None

    def open(self) -> str | None:
        """A new session's id, or None while another session is open."""
        with self._lock:
            if self._current is not None:
                return None
            self._current = secrets.token_hex(16)
            return self._current

    def close(self, session: str) -> None:
        with self._lock:
            if self._current == session:
                self._current = None

    def admits(self, offered: str | None) -> bool:
        current = self._current
        return current is not None and offered is not None and hmac.compare_digest(offered.encode(), current.encode())


class LinkGuard(grpc.ServerInterceptor):
    """Checks every call before its handler runs (and before its request is parsed): the token
    (constant-time compare) when the driver has one, else UNAUTHENTICATED; on every method but
    Attach, the current session, else FAILED_PRECONDITION."""

    def __init__(self, token: str | None, sessions: SessionGate) -> None:
        self._token = None if token is None else f"Bearer {token}".encode()
        self._sessions = sessions

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = handler_call_details.invocation_metadata or ()
        if self._token is not None and not hmac.compare_digest(_single(metadata, TOKEN_HEADER).encode(), self._token):
            return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, f"the driver link needs its token ({TOKEN_HEADER}: Bearer <token>)")
        if handler_call_details.method != ATTACH_METHOD and not self._sessions.admits(_single(metadata, SESSION_HEADER) or None):
            return _refusing(
                handler,
                grpc.StatusCode.FAILED_PRECONDITION,
                "not the driver's current gateway session (a driver serves one gateway at a time: Attach first)",
            )
        return handler


def _single(metadata, key: str) -> str:
    """The one value of a metadata key; "" when absent, repeated or binary."""
    values = [value for name, value in metadata if name == key]
    return values[0] if len(values) == 1 and isinstance(values[0], str) else ""


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with code, without parsing the request."""

    def refuse(request, context):
        context.abort(code, message)

    def refuse_stream(request, context):
        context.abort(code, message)
        yield  # a generator, like the handler it replaces

    kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
    behaviour: Callable = refuse_stream if handler.response_streaming else refuse
    return getattr(grpc, f"{kind}_rpc_method_handler")(behaviour, response_serializer=handler.response_serializer)
