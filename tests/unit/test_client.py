"""The client puts its calls in the caller's trace."""

from shardgate.clients.client import Client
from span_capture import capture_spans


def test_calls_carry_the_current_span_or_an_explicit_traceparent():
    provider, _ = capture_spans()
    with Client("127.0.0.1:1") as client:  # never connects: only metadata is built
        assert client.trace_metadata() == ()  # no active span, no context
        with provider.get_tracer("caller").start_as_current_span("caller") as span:
            [(key, value)] = client.trace_metadata()
            context = span.get_span_context()
            assert key == "traceparent" and value.startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
            explicit = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            assert client.trace_metadata(explicit) == (("traceparent", explicit),)
