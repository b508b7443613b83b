"""shardgate's client library: `Client` (blocking) and `AsyncClient` (asyncio), typed results
and exceptions. Needs only grpcio, protobuf and grpcio-health-checking.

The names load on first use (PEP 562), so that importing a submodule — the `shardgate` command
(cli.py) first imports grpc_runtime — does not load grpc before the command has configured it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardgate.clients.async_client import AsyncBidiStream, AsyncClient
    from shardgate.clients.client import BidiStream, Client
    from shardgate.clients.connection import TLS, Retry
    from shardgate.clients.errors import (
        Cancelled,
        DeadlineExceeded,
        InvalidRequest,
        Overloaded,
        PermissionDenied,
        ServerError,
        ShardgateError,
        Unauthenticated,
        Unavailable,
        Unimplemented,
    )
    from shardgate.clients.messages import build_embed_request, build_request
    from shardgate.clients.results import Completion, Delta, Embeddings, ModelInfo, RequestFailed, Usage

_NAMES = {
    "async_client": ("AsyncBidiStream", "AsyncClient"),
    "client": ("BidiStream", "Client"),
    "connection": ("TLS", "Retry"),
    "errors": (
        "Cancelled",
        "DeadlineExceeded",
        "InvalidRequest",
        "Overloaded",
        "PermissionDenied",
        "ServerError",
        "ShardgateError",
        "Unauthenticated",
        "Unavailable",
        "Unimplemented",
    ),
    "messages": ("build_embed_request", "build_request"),
    "results": ("Completion", "Delta", "Embeddings", "ModelInfo", "RequestFailed", "Usage"),
}
_MODULES = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str) -> object:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AsyncBidiStream",
    "AsyncClient",
    "BidiStream",
    "Cancelled",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "Delta",
    "Embeddings",
    "InvalidRequest",
    "ModelInfo",
    "Overloaded",
    "PermissionDenied",
    "RequestFailed",
    "Retry",
    "ServerError",
    "ShardgateError",
    "TLS",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Usage",
    "build_embed_request",
    "build_request",
]
