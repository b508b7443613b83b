"""shardgate's client library: `Client` (blocking) and `AsyncClient` (asyncio), typed results
and exceptions. Needs only grpcio, protobuf and grpcio-health-checking."""

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
