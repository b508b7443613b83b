"""Errors carry machine-readable details the client library reads back: RetryInfo on
RESOURCE_EXHAUSTED and UNAVAILABLE, BadRequest naming the field on INVALID_ARGUMENT."""

import grpc
import pytest

from shardgate.clients.errors import InvalidRequest, Overloaded, ServerError, Unavailable, from_rpc_error
from shardgate.server.rich_status import status_of
from shardgate.server.validation import RequestError, invalid


class RaisedRpcError(grpc.RpcError):
    """What a grpc call raises for a status: its code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailer: tuple = ()) -> None:
        self._code, self._details, self._trailer = code, details, trailer

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailer


def round_trip(error: RequestError):
    status = status_of(error)
    assert (status.code, status.details) == (error.code, str(error))
    return from_rpc_error(RaisedRpcError(status.code, status.details, status.trailing_metadata))


@pytest.mark.parametrize(
    ("error", "kind", "delay"),
    [
        (RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_concurrent_requests", "full"), Overloaded, 1.0),
        (RequestError(grpc.StatusCode.UNAVAILABLE, None, "the model is still loading", retry_delay_s=5.0), Unavailable, 5.0),
        (RequestError(grpc.StatusCode.UNAVAILABLE, None, "lost", retry_delay_s=0.25), Unavailable, 0.25),
    ],
)
def test_overload_and_unavailable_carry_a_retry_delay(error, kind, delay):
    raised = round_trip(error)
    assert isinstance(raised, kind) and raised.retry_delay == delay and raised.field is None
    assert raised.details() == str(error)


def test_invalid_argument_names_the_field():
    raised = round_trip(invalid("messages[1].role", "must be set"))
    assert isinstance(raised, InvalidRequest) and raised.field == "messages[1].role" and raised.retry_delay is None
    assert raised.details() == "messages[1].role: must be set"


def test_other_codes_and_plain_statuses_carry_nothing():
    raised = round_trip(RequestError(grpc.StatusCode.INTERNAL, None, "boom"))
    assert isinstance(raised, ServerError) and raised.retry_delay is None and raised.field is None
    plain = from_rpc_error(RaisedRpcError(grpc.StatusCode.UNAVAILABLE, "down"))  # no trailer: e.g. from gRPC itself
    assert isinstance(plain, Unavailable) and plain.retry_delay is None


def test_an_unreadable_trailer_leaves_the_code_and_message():
    error = RaisedRpcError(grpc.StatusCode.INVALID_ARGUMENT, "prompt: bad", (("grpc-status-details-bin", b"\xff\xff not a status"),))
    raised = from_rpc_error(error)
    assert isinstance(raised, InvalidRequest) and raised.details() == "prompt: bad" and raised.field is None
