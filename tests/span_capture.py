"""A tracer provider that keeps finished spans in memory, for unit tests."""

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler


def capture_spans(sampler: Sampler | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    """(provider, exporter): spans end up in exporter.get_finished_spans() as they end."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter
