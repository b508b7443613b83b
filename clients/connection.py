"""How a client connects and calls: TLS, bearer token, retry policy (a gRPC service config), trace context."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from shardgate.proto import inference_pb2
from shardgate.proto.tls import channel_credentials

try:  # optional: with opentelemetry-api installed, calls carry the caller's trace context
    from opentelemetry import propagate as _otel_propagate
except (ImportError, ValueError):  # ValueError: OTEL_PROPAGATORS names a propagator not installed (`serve` reports it)
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


RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
"""The statuses a retry re-sends: the server is down or starting, or its queue is full."""
MAX_ATTEMPTS = 5
"""gRPC's limit on attempts per call (it clamps a larger retryPolicy.maxAttempts to this)."""
RETRIED_SERVICES = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name, "grpc.health.v1.Health")
NEVER_RETRIED = ((RETRIED_SERVICES[0], "GenerateBidi"),)
"""Methods left out of the retry policy: a bidi stream carries many requests."""


@dataclass(frozen=True)
class Retry:
    """Retries of calls that failed with UNAVAILABLE or RESOURCE_EXHAUSTED before any answer
    arrived, done by gRPC itself (the channel's service-config retryPolicy): a call is committed,
    and never sent again, once the server's first message or headers reached the client, so a
    stream that has yielded a token is never re-sent; a bidi stream is never retried. All
    attempts share the call's deadline. The wait before attempt n+1 is
    min(max_backoff_s, initial_backoff_s × multiplier^(n-1)), scaled by gRPC's random factor in
    [0.8, 1.2] so clients spread out."""

    attempts: int = 3
    """Most attempts in all, the first included: 1 (no retries) to 5 (gRPC's limit)."""
    initial_backoff_s: float = 0.1
    """Wait before the second attempt."""
    max_backoff_s: float = 2.0
    """Longest wait between attempts."""
    multiplier: float = 2.0
    """Each wait is this many times the previous one."""

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= MAX_ATTEMPTS:
            raise ValueError(f"Retry.attempts must be in [1, {MAX_ATTEMPTS}] (gRPC's limit)")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("Retry: need 0 < initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("Retry.multiplier must be >= 1")

    def service_config(self) -> dict | None:
        """The channel's gRPC service config (the `grpc.service_config` option, as JSON) that
        makes these retries; None for a single attempt."""
        if self.attempts == 1:
            return None
        policy = {
            "maxAttempts": self.attempts,
            "initialBackoff": f"{self.initial_backoff_s:.9f}s",
            "maxBackoff": f"{self.max_backoff_s:.9f}s",
            "backoffMultiplier": self.multiplier,
            "retryableStatusCodes": list(RETRYABLE_CODES),
        }
        return {
            "methodConfig": [
                {"name": [{"service": service} for service in RETRIED_SERVICES], "retryPolicy": policy},
                {"name": [{"service": service, "method": method} for service, method in NEVER_RETRIED]},
            ]
        }


NO_RETRY = Retry(attempts=1)


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


def channel_options(tls: TLS | None, max_message_bytes: int, retry: Retry) -> list[tuple[str, object]]:
    """The channel's options: message size limit, TLS name override, and the retry policy (its
    per-call buffer holds requests up to max_message_bytes, so a large prompt is re-sent too;
    gRPC's default buffer is 256 KiB, beyond which a call is never retried)."""
    options: list[tuple[str, object]] = [("grpc.max_receive_message_length", max_message_bytes)]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    service_config = retry.service_config()
    if service_config is not None:
        options += [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(service_config)),
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ]
    return options
