"""What the gateway, the shards and the clients agree on: dtype and quantization names, the
shard's error-line prefix, the internal message limit, the tracing exporters (OTEL_* checked), free ports.

A leaf: it imports only the standard library (so the configs that use it import without any
dependency), and nothing of the server, the shards or the clients. TLS credentials are in
shardgate.proto.tls, tracing set-up in shardgate.proto.tracing.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points

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


LOG_FORMATS = ("text", "json")
"""What `--log-format` takes, in the gateway and the shards (shardgate.proto.logs)."""

TRACES_EXPORTERS = ("otlp", "console", "none")
"""What OTEL_TRACES_EXPORTER may list (comma-separated), besides the name of any other installed
span exporter (entry-point group opentelemetry_traces_exporter)."""
OTLP_PROTOCOLS = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
"""OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL values → the OTLP exporter's entry-point name."""


@dataclass(frozen=True)
class TracingConfig:
    """Which span exporters a process runs, from the standard OpenTelemetry environment.

    OTEL_TRACES_EXPORTER lists them (otlp, console, none); unset, a process exports over OTLP
    only when an endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or its _TRACES_ variant), so a
    server started without OTEL_* exports nothing. otlp is OTLP/gRPC or OTLP/HTTP (protobuf) as
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL, says (default grpc).
    OTEL_SDK_DISABLED=true turns tracing off. Each exporter is the one its package registers
    under that name (entry-point group opentelemetry_traces_exporter, as the SDK's own
    auto-configuration loads them) and reads its other variables itself (endpoint, headers,
    TLS, timeout); the SDK reads the service name, resource attributes, sampler and batching;
    opentelemetry.propagate reads OTEL_PROPAGATORS, checked here so that a bad name is a clear
    startup error. The set-up that uses this is shardgate.proto.tracing.
    """

    exporters: tuple[str, ...] = ()
    """Entry-point names of the span exporters (otlp_proto_grpc, otlp_proto_http, console); empty: no tracing."""

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TracingConfig:
        """Raises ValueError naming the variable whose value is not valid (or whose exporter or
        propagator is not installed)."""
        _check_propagators(environ.get("OTEL_PROPAGATORS", ""))
        protocol_variable = next(
            (name for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") if environ.get(name, "").strip()),
            None,
        )
        protocol = environ[protocol_variable].strip() if protocol_variable else "grpc"
        if protocol not in OTLP_PROTOCOLS:
            raise ValueError(f"{protocol_variable}={protocol!r} is not one of {', '.join(OTLP_PROTOCOLS)}")
        listed = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
        for name in listed:
            if name not in TRACES_EXPORTERS and not entry_points(group="opentelemetry_traces_exporter", name=name):
                raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not one of {', '.join(TRACES_EXPORTERS)} or an installed span exporter")
        if not listed and (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            listed = ["otlp"]
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or "none" in listed:
            return cls()
        exporters = tuple(dict.fromkeys(OTLP_PROTOCOLS[protocol] if name == "otlp" else name for name in listed))
        for exporter in exporters:
            if not entry_points(group="opentelemetry_traces_exporter", name=exporter):
                package = "opentelemetry-exporter-" + exporter.replace("_", "-") if exporter.startswith("otlp") else "opentelemetry-sdk"
                variable = protocol_variable or "OTEL_TRACES_EXPORTER"
                raise ValueError(f"{variable}: the {exporter} span exporter is not installed (pip install {package})")
        return cls(exporters)


def _check_propagators(value: str) -> None:
    """OTEL_PROPAGATORS names installed propagators (entry-point group opentelemetry_propagator),
    or none; opentelemetry.propagate would otherwise fail with a traceback when first imported."""
    for name in (name.strip() for name in value.split(",")):
        if name and name.lower() != "none" and not entry_points(group="opentelemetry_propagator", name=name):
            installed = sorted(point.name for point in entry_points(group="opentelemetry_propagator"))
            raise ValueError(f"OTEL_PROPAGATORS: {name!r} is not an installed propagator ({', '.join(installed)}, none)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on host (for MASTER_PORT or a test server; never a fixed one)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
