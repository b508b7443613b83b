"""Python client of the shardgate Inference API (needs only grpcio and protobuf).

Tracing: a call joins the caller's trace. With OpenTelemetry's API installed (`pip install
shardgate[tracing]`), the current span's context goes with each generation call as W3C
`traceparent` metadata; a `traceparent=` argument sets it explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from shardgate.proto import inference_pb2, inference_pb2_grpc

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
    device_seconds: float
    cost: float

    @classmethod
    def from_proto(cls, message: inference_pb2.Usage) -> "Usage":
        return cls(
            message.prompt_tokens,
            message.completion_tokens,
            message.queue_time_s,
            message.time_to_first_token_s,
            message.replica,
            message.device_seconds,
            message.cost,
        )


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Delta:
    """One streamed message: new text and tokens; the last one has finish_reason and usage."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    usage: Usage | None


def build_request(
    prompt: str | list[int],
    *,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    request_id: str = "",
    priority: int = 0,
    timeout_ms: int = 0,
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; a prompt given as a list of ints is sent as token ids."""
    message = inference_pb2.GenerateRequest(
        request_id=request_id,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        stop=stop or [],
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        priority=priority,
        timeout_ms=timeout_ms,
    )
    if isinstance(prompt, str):
        message.prompt = prompt
    else:
        message.prompt_token_ids.ids.extend(prompt)
    if temperature is not None:
        message.temperature = temperature
    if top_p is not None:
        message.top_p = top_p
    if seed is not None:
        message.seed = seed
    return message


def _trace_injector() -> Callable[[dict], None] | None:
    """OpenTelemetry's context injector, when its API is installed."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return None
    return propagate.inject


class Client:
    """Blocking client: `Client("127.0.0.1:50051").generate("Hello", max_new_tokens=16)`."""

    def __init__(self, address: str, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._inject = _trace_injector()

    def trace_metadata(self, traceparent: str | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC metadata that puts a call in a trace: the given traceparent, else the current
        OpenTelemetry context (none without an active span or without OpenTelemetry)."""
        if traceparent:
            return (("traceparent", traceparent),)
        carrier: dict[str, str] = {}
        if self._inject is not None:
            self._inject(carrier)
        return tuple(carrier.items())

    def generate(self, prompt: str | list[int], traceparent: str | None = None, **params) -> Completion:
        response = self._stub.Generate(build_request(prompt, **params), timeout=self.timeout, metadata=self.trace_metadata(traceparent))
        return Completion(
            request_id=response.request_id,
            text=response.text,
            token_ids=list(response.token_ids),
            finish_reason=FINISH_REASONS[response.finish_reason],
            usage=Usage.from_proto(response.usage),
            logprobs=list(response.logprobs),
        )

    def stream(self, prompt: str | list[int], traceparent: str | None = None, **params) -> Iterator[Delta]:
        call = self._stub.GenerateStream(build_request(prompt, **params), timeout=self.timeout, metadata=self.trace_metadata(traceparent))
        for message in call:
            last = message.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
            yield Delta(
                request_id=message.request_id,
                text=message.text,
                token_ids=list(message.token_ids),
                logprobs=list(message.logprobs),
                finish_reason=FINISH_REASONS[message.finish_reason],
                usage=Usage.from_proto(message.usage) if last else None,
            )

    def embed(self, inputs: list[str], *, pooling: str = "mean", normalize: bool = False, priority: int = 0, timeout_ms: int = 0) -> list[list[float]]:
        """One vector per input; pooling is "mean" or "last"."""
        request = inference_pb2.EmbedRequest(
            inputs=inputs,
            pooling={"mean": inference_pb2.POOLING_MEAN, "last": inference_pb2.POOLING_LAST}[pooling],
            normalize=normalize,
            priority=priority,
            timeout_ms=timeout_ms,
        )
        return [list(e.values) for e in self._stub.Embed(request, timeout=self.timeout).embeddings]

    def server_status(self) -> inference_pb2.ServerStatusResponse:
        return self._stub.ServerStatus(inference_pb2.ServerStatusRequest(), timeout=self.timeout)

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        request = inference_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self._stub.Tokenize(request, timeout=self.timeout).token_ids)

    def model_info(self) -> inference_pb2.ModelInfoResponse:
        return self._stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
