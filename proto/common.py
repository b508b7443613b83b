"""What the gateway, the shards and the clients agree on: dtype and quantization names, the
shard's error-line prefix, the internal message limit, the tracing switch, free ports.

A leaf: it imports only the standard library (so the configs that use it import without any
dependency), and nothing of the server, the shards or the clients. TLS credentials are in
shardgate.proto.tls, tracing set-up in shardgate.proto.tracing.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each weight and activation dtype a replica can run in (`--dtype`)."""
DTYPES = tuple(DTYPE_BYTES)
"""The dtype names; the shards map each to the torch dtype of the same name."""
DTYPE_CHOICES = ("auto", *DTYPES)
"""What `--dtype` takes: a dtype name, or auto (the shard chooses one: shards/dtype_choice.py)."""

QUANTIZATIONS = ("none", "int8")
"""Weight quantizations a replica can load with (`--quantize`)."""

SHARD_ERROR_PREFIX = "shard: "
"""How a shard process's stderr line starts when it states why the shard stops (one line, then
exit code 2): the gateway holds such a line back from its own stderr and reports it once as the
replica's failure (server/replicas/launcher.py)."""

INTERNAL_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest message either end of the gateway ↔ driver link sends or receives (the tokenizer
travels in Describe, and a large tokenizer.json alone is several MB)."""


@dataclass(frozen=True)
class TracingConfig:
    """Whether a process exports spans, from the standard OpenTelemetry environment.

    Only the switch is read here; the SDK reads the other OTEL_* variables itself (service
    name, resource attributes, sampler, batch processor, exporter headers and TLS). The set-up
    that uses it is shardgate.proto.tracing.
    """

    endpoint: str = ""
    """OTLP/gRPC collector (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT); empty: no tracing."""
    disabled: bool = False
    """OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none: no tracing, whatever the endpoint."""

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint) and not self.disabled

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TracingConfig:
        return cls(
            endpoint=environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            disabled=environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
            or environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none",
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on host (for MASTER_PORT or a test server; never a fixed one)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
