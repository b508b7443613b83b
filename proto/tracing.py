"""OpenTelemetry set-up shared by every shardgate process: the gateway and each shard rank.

Each process calls `init_tracing` once, after it starts, and so has a tracer provider of its
own that exports spans over OTLP/gRPC in a background thread (batched). With tracing off (no
endpoint, OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none) no provider is made and the
SDK is not even imported: callers get None and open no spans.

Trace context crosses processes as W3C `traceparent` strings. A leaf beside
shardgate.proto.common: it imports neither torch nor the gateway, the shards or the clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    provider = TracerProvider(resource=resource)
    if wrap_sampler is not None:
        provider.sampler = wrap_sampler(provider.sampler)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def traceparent(span: trace.Span) -> str:
    """The W3C traceparent header value of a span."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, trace.set_span_in_context(span))
    return carrier.get(TRACEPARENT, "")


def context_from_traceparent(value: str) -> otel_context.Context:
    """A context whose current span is the (remote) span a traceparent names."""
    return _W3C.extract({TRACEPARENT: value})


def context_from_metadata(metadata: Iterable[tuple[str, str]]) -> otel_context.Context | None:
    """The caller's context from gRPC metadata with a traceparent header; None without one."""
    for key, value in metadata:
        if key == TRACEPARENT:
            return context_from_traceparent(value)
    return None
