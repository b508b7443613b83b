"""OpenTelemetry set-up shared by every shardgate process: the gateway and each shard rank.

Each process calls `init_tracing` once, after it starts, and so has a tracer provider of its
own that exports spans in a background thread (batched) through the exporters the OTEL_*
environment chooses (shardgate.proto.common.TracingConfig). With tracing off no provider is
made and the SDK is not even imported: callers get None and open no spans.

Trace context crosses processes with the global propagator of `opentelemetry.propagate`
(OTEL_PROPAGATORS; default W3C trace context and baggage): the gateway injects it into a
call's gRPC metadata and the driver extracts it. Inside a replica, from the driver to the other
ranks, it travels as a W3C `traceparent` string in the step plan. A leaf beside
shardgate.proto.common: it imports neither torch nor the gateway, the shards or the clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shardgate.proto.common import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler

_W3C = TraceContextTextMapPropagator()
TRACEPARENT = "traceparent"
SHARD_STEP_RPC = {"rpc.system": "grpc", "rpc.service": "shardgate.shard.v1.Shard", "rpc.method": "Step"}
"""RPC semantic-convention attributes of the gateway → driver Step call (on both ends' spans)."""


def init_tracing(
    config: TracingConfig,
    default_service_name: str,
    wrap_sampler: Callable[[Sampler], Sampler] | None = None,
) -> TracerProvider | None:
    """This process's tracer provider, also made the global one; None when tracing is off.

    The service name is OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) when
    set, else default_service_name. wrap_sampler, if given, wraps the sampler the SDK built from
    OTEL_TRACES_SAMPLER. The provider flushes its spans when the process exits normally."""
    if not config.enabled:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    provider = TracerProvider(resource=resource)
    if wrap_sampler is not None:
        provider.sampler = wrap_sampler(provider.sampler)
    for name in config.exporters:
        exporter = next(iter(entry_points(group="opentelemetry_traces_exporter", name=name)))  # present: TracingConfig checked
        provider.add_span_processor(BatchSpanProcessor(exporter.load()()))
    trace.set_tracer_provider(provider)
    return provider


def inject_metadata(context: otel_context.Context) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying `context` as the global propagator writes it."""
    from opentelemetry import propagate  # reads OTEL_PROPAGATORS when first imported (checked by TracingConfig)

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context)
    return tuple(carrier.items())


def extract_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> otel_context.Context | None:
    """The caller's context from a call's gRPC metadata, as the global propagator reads it;
    None when it names no span."""
    from opentelemetry import propagate

    context = propagate.extract({key: value for key, value in metadata if isinstance(value, str)})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def traceparent(span: trace.Span) -> str:
    """The W3C traceparent header value of a span."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, trace.set_span_in_context(span))
    return carrier.get(TRACEPARENT, "")


def context_from_traceparent(value: str) -> otel_context.Context:
    """A context whose current span is the (remote) span a traceparent names."""
    return _W3C.extract({TRACEPARENT: value})


def trace_ids(span: trace.Span) -> tuple[str, str]:
    """(trace id, span id) of a span in hex; empty strings for an invalid one."""
    context = span.get_span_context()
    return (f"{context.trace_id:032x}", f"{context.span_id:016x}") if context.is_valid else ("", "")
