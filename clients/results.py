"""What client calls return: plain dataclasses, converted from the API's protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from shardgate.clients.errors import ShardgateError, error_for
from shardgate.proto import inference_pb2

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_UNSPECIFIED: None,
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_EOS: "eos",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
    inference_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_time_s: float
    time_to_first_token_s: float
    replica: int
    """Index of the replica that served the request."""
    device_seconds: float
    """The request's share of device time."""
    cost: float
    """device_seconds priced by the server's --device-cost-per-hour (0 when unpriced)."""
    cached_tokens: int
    """Prompt tokens served from the server's prefix cache instead of computed."""
    resumes: int = 0
    """Times the generation moved to another replica (its own failed or was preempted) and continued there."""

    @classmethod
    def from_proto(cls, message: inference_pb2.Usage) -> Usage:
        return cls(
            message.prompt_tokens,
            message.completion_tokens,
            message.queue_time_s,
            message.time_to_first_token_s,
            message.replica,
            message.device_seconds,
            message.cost,
            message.cached_tokens,
            message.resumes,
        )


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[float] = field(default_factory=list)

    @classmethod
    def from_proto(cls, message: inference_pb2.GenerateResponse) -> Completion:
        return cls(
            request_id=message.request_id,
            text=message.text,
            token_ids=list(message.token_ids),
            finish_reason=FINISH_REASONS[message.finish_reason],
            usage=Usage.from_proto(message.usage),
            logprobs=list(message.logprobs),
        )


@dataclass(frozen=True)
class Delta:
    """One streamed message: new text and tokens; the last one has finish_reason and usage."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    usage: Usage | None

    @classmethod
    def from_proto(cls, message: inference_pb2.GenerateStreamResponse) -> Delta:
        last = message.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
        return cls(
            request_id=message.request_id,
            text=message.text,
            token_ids=list(message.token_ids),
            logprobs=list(message.logprobs),
            finish_reason=FINISH_REASONS[message.finish_reason],
            usage=Usage.from_proto(message.usage) if last else None,
        )


@dataclass(frozen=True)
class RequestFailed:
    """On a multiplexed (bidi) stream: one request ended with an error; the others go on."""

    request_id: str
    error: ShardgateError


def bidi_event(message: inference_pb2.GenerateBidiResponse) -> Delta | RequestFailed:
    if message.WhichOneof("event") == "error":
        status = message.error
        code = _STATUS_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        return RequestFailed(status.request_id, error_for(code, status.message, status.details))
    return Delta.from_proto(message.message)


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class Embeddings:
    """One vector per input, in input order."""

    request_id: str
    vectors: list[list[float]]
    tokens: list[int]
    """Tokens each input had."""
    usage: Usage

    @classmethod
    def from_proto(cls, message: inference_pb2.EmbedResponse) -> Embeddings:
        return cls(
            request_id=message.request_id,
            vectors=[list(e.values) for e in message.embeddings],
            tokens=[e.tokens for e in message.embeddings],
            usage=Usage.from_proto(message.usage),
        )


ModelInfo = inference_pb2.ModelInfoResponse
"""The served model and its limits: the ModelInfoResponse message itself (see inference.proto),
as the shard described the model and the gateway completed it."""
