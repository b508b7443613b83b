"""How a client connects and calls: TLS, bearer token, retry policy, deadlines, trace context."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from shardgate.clients.errors import DeadlineExceeded, ShardgateError
from shardgate.proto.tls import channel_credentials

try:  # optional: with opentelemetry-api installed, calls carry the caller's trace context
    from opentelemetry import propagate as _otel_propagate
except ImportError:
    _otel_propagate = None


@dataclass(frozen=True)
class TLS:
    """TLS settings of the channel; every field may be PEM bytes or a file path."""

    root_certificates: bytes | str | Path | None = None
    """CA certificates that sign the server's certificate; None = the system's roots."""
    certificate_chain: bytes | str | Path | None = None
    """This client's certificate, for servers that require mutual TLS."""
    private_key: bytes | str | Path | None = None
    """The key of certificate_chain."""
    server_name: str | None = None
    """Check the server's certificate against this name instead of the address's host."""

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("TLS: certificate_chain and private_key go together")

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class Retry:
    """Retries of calls that failed with UNAVAILABLE or RESOURCE_EXHAUSTED before any token
    arrived (a stream that has yielded tokens is never sent again); all attempts share the
    call's deadline."""

    attempts: int = 3
    """Most attempts in all, the first included."""
    initial_backoff_s: float = 0.1
    """Wait before the second attempt."""
    max_backoff_s: float = 2.0
    """Longest wait between attempts."""
    multiplier: float = 2.0
    """Each wait is this many times the previous one."""
    jitter: float = 0.2
    """Each wait is scaled by a random factor in [1 - jitter, 1 + jitter] so clients spread out."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be >= 1")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("Retry: need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("Retry.multiplier must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("Retry.jitter must be in [0, 1)")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 = the first)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


NO_RETRY = Retry(attempts=1)


class Deadline:
    """One call's deadline, shared by all its attempts."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (None = no deadline); raises DeadlineExceeded when none are."""
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return left


def next_wait(policy: Retry, error: ShardgateError, attempt: int, deadline: Deadline) -> float | None:
    """Seconds to wait before trying again after `error` on attempt `attempt`, or None to give up."""
    if not error.retryable or attempt >= policy.attempts:
        return None
    wait = policy.backoff(attempt)
    try:
        left = deadline.remaining()
    except DeadlineExceeded:
        return None
    return None if left is not None and wait >= left else wait


def call_metadata(token: str | None, traceparent: str | None = None) -> list[tuple[str, str]]:
    """The bearer token, if any, and the trace context: the given W3C traceparent, else the
    current OpenTelemetry context (when opentelemetry-api is installed)."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    if traceparent:
        metadata.append(("traceparent", traceparent))
    elif _otel_propagate is not None:
        carrier: dict[str, str] = {}
        _otel_propagate.inject(carrier)
        metadata.extend(carrier.items())
    return metadata


def channel_options(tls: TLS | None, max_message_bytes: int) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [("grpc.max_receive_message_length", max_message_bytes)]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options
