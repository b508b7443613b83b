"""OpenAI error objects (`{"error": {"message", "type", "param", "code"}}`) with their HTTP
statuses, made from the engine API's RequestError (whose field names are the native API's)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import grpc

from shardgate.server.validation import RequestError

RETRY_AFTER_S = 1
"""What a 429 asks the client to wait: admission frees as soon as any request ends."""

# gRPC status → (HTTP status, OpenAI error type, OpenAI error code)
_STATUSES: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", "cancelled"),
}
_INTERNAL = (500, "server_error", None)

# The native API's field (its first part) → the OpenAI parameter that sets it.
_PARAMS = {
    "max_new_tokens": "max_tokens",
    "prompt_token_ids": "prompt",
    "inputs": "input",
    "request_id": None,  # made by the frontend, never the caller's
}
_FIRST_PART = re.compile(r"^[a-z_]+")


class OpenAIError(Exception):
    """An error response: its HTTP status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else {}


def invalid_param(param: str | None, message: str) -> OpenAIError:
    """A 400 naming the parameter at fault."""
    return OpenAIError(400, f"{param}: {message}" if param else message, "invalid_request_error", param)


def _rename(field: str, renames: Mapping[str, str]) -> tuple[str | None, str]:
    """(the OpenAI parameter, the field path in OpenAI's names) of a native field: `stop[1]` →
    (`stop`, `stop[1]`), `max_new_tokens` → the name the request used for it (`renames`),
    `inputs[0]` → (`input`, `input[0]`)."""
    first = _FIRST_PART.match(field)
    name = first.group(0) if first else field
    param = renames[name] if name in renames else _PARAMS.get(name, name)
    return param, (param or "") + field[len(name) :]


def _renamed(detail: str, field: str, param: str | None) -> str:
    """The message's own mentions of the native field in the parameter's name."""
    first = _FIRST_PART.match(field)
    return detail if param is None or first is None else detail.replace(first.group(0), param)


def from_request_error(error: RequestError, renames: Mapping[str, str] | None = None) -> OpenAIError:
    """The engine API's refusal as an OpenAI error. A RESOURCE_EXHAUSTED's field is a server
    bound (max_queue_tokens), not a parameter: it stays in the message only."""
    status, type, code = _STATUSES.get(error.code, _INTERNAL)
    if error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field is not None:
        param, path = _rename(error.field, renames or {})
        detail = _renamed(str(error).removeprefix(f"{error.field}: "), error.field, param)
        return OpenAIError(status, f"{path}: {detail}" if param else detail, type, param, code)
    return OpenAIError(status, str(error), type, None, code)
