"""gRPC statuses as a small exception hierarchy, so callers catch what they can act on.

Every exception is also a `grpc.RpcError` with `code()` and `details()`, so code written
against raw grpc keeps working. The machine-readable details a status carries (google.rpc, in the
`grpc-status-details-bin` trailer) are read too: `retry_delay` (RetryInfo) and `field`
(BadRequest).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class ShardgateError(grpc.RpcError):
    """A call that ended with a non-OK status."""

    retryable = False
    """Whether the same call may succeed if sent again (overload, a server not up yet)."""

    retry_delay: float | None
    """Seconds the server asks the caller to wait before sending the call again (RetryInfo); None if it said nothing."""
    field: str | None
    """The request field at fault (the first BadRequest field violation); None if none was named."""

    def __init__(self, code: grpc.StatusCode, details: str, status_details: Iterable[any_pb2.Any] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details
        self.retry_delay, self.field = None, None
        for detail in status_details:
            retry, bad_request = error_details_pb2.RetryInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(retry):
                self.retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Unpack(bad_request) and bad_request.field_violations and self.field is None:
                self.field = bad_request.field_violations[0].field

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class InvalidRequest(ShardgateError):
    """The request itself is wrong (the message names the field); sending it again will not help."""


class Overloaded(ShardgateError):
    """RESOURCE_EXHAUSTED: the server's queue or a size limit is full."""

    retryable = True


class DeadlineExceeded(ShardgateError):
    """The deadline passed before the call finished."""


class Unavailable(ShardgateError):
    """UNAVAILABLE: the server is down, starting, or lost its model replica."""

    retryable = True


class Unauthenticated(ShardgateError):
    """The server needs credentials (a bearer token or client certificate) the call lacked."""


class PermissionDenied(ShardgateError):
    """The credentials were valid but do not allow this call."""


class Cancelled(ShardgateError):
    """The call was cancelled (by this client, or the server gave up on it)."""


class Unimplemented(ShardgateError):
    """The server does not offer this method (an older server, or a method it does not serve yet)."""


class ServerError(ShardgateError):
    """The server failed (INTERNAL, UNKNOWN, DATA_LOSS, ABORTED): a bug or a crash on its side."""


_BY_CODE: dict[grpc.StatusCode, type[ShardgateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: InvalidRequest,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.DATA_LOSS: ServerError,
    grpc.StatusCode.ABORTED: ServerError,
}


def error_for(code: grpc.StatusCode, details: str, status_details: Iterable[any_pb2.Any] = ()) -> ShardgateError:
    """The exception for a status code, its message and its google.rpc details."""
    return _BY_CODE.get(code, ServerError)(code, details, status_details)


def from_rpc_error(error: grpc.RpcError) -> ShardgateError:
    """Maps an error raised by a grpc call (sync or aio) to the hierarchy."""
    if isinstance(error, ShardgateError):
        return error
    return error_for(error.code(), error.details() or "", _status_details(error))


def _status_details(error: grpc.RpcError) -> list[any_pb2.Any]:
    """The details of the google.rpc.Status in the error's trailer (none if it has none, or an
    unreadable one: the code and message still stand)."""
    trailer = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailer or ():
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY:
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:  # a bad trailer must not hide the call's own error
                return []
            return list(status.details)
    return []
