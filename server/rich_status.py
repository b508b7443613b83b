"""A RequestError as a gRPC status with machine-readable details: the google.rpc messages that
grpcio-status sends in the `grpc-status-details-bin` trailer, so a client need not parse the
message. RESOURCE_EXHAUSTED and UNAVAILABLE carry RetryInfo (how long to wait before sending
the call again); INVALID_ARGUMENT carries BadRequest naming the field at fault."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from shardgate.server.validation import RequestError

DEFAULT_RETRY_DELAY_S = {grpc.StatusCode.RESOURCE_EXHAUSTED: 1.0, grpc.StatusCode.UNAVAILABLE: 1.0}
"""The wait a refusal of these codes suggests when its RequestError names none."""


def retry_delay_s(error: RequestError) -> float | None:
    """Seconds to wait before sending the call again, for the codes where waiting may help (an
    HTTP frontend's Retry-After); None for the others."""
    if error.code not in DEFAULT_RETRY_DELAY_S:
        return None
    return error.retry_delay_s if error.retry_delay_s is not None else DEFAULT_RETRY_DELAY_S[error.code]


def error_details(error: RequestError) -> list[any_pb2.Any]:
    """The google.rpc detail messages of an error, packed (none for the other codes)."""
    detail = None
    delay = retry_delay_s(error)
    if delay is not None:
        detail = error_details_pb2.RetryInfo()
        detail.retry_delay.FromNanoseconds(round(delay * 1e9))
    elif error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field:
        description = str(error).removeprefix(f"{error.field}: ")
        detail = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=error.field, description=description)]
        )
    if detail is None:
        return []
    packed = any_pb2.Any()
    packed.Pack(detail)
    return [packed]


def status_of(error: RequestError) -> grpc.Status:
    """The call's status: code, message, and the details in the trailer."""
    status = status_pb2.Status(code=error.code.value[0], message=str(error), details=error_details(error))
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    """Ends the call with the error's status and details (raises, as context.abort does)."""
    await context.abort_with_status(status_of(error))
