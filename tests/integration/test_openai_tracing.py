"""Tracing of the OpenAI HTTP frontend: a request's `traceparent` header joins the caller's
trace, and under the HTTP server span the request's span (GenAI conventions) carries the
engine's stages and GenAI attributes as under the gRPC server span (tests/otlp_receiver.py collects the spans)."""

import secrets

import openai
import pytest
from otlp_receiver import otlp_receiver
from servers import start_server

from shardgate.proto.common import free_port

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    with otlp_receiver() as (endpoint, spans):
        http_port = free_port()
        with pytest.MonkeyPatch.context() as env:
            for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
                env.delenv(name, raising=False)
            env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
            server = start_server(tmp_path_factory.mktemp("logs"), "--http-port", str(http_port), "--kv-cache-memory", str(16 << 20))
        try:
            yield f"http://127.0.0.1:{http_port}/v1", spans
        finally:
            server.stop()


def test_a_completion_joins_the_callers_trace_with_the_engine_spans_under_it(traced):
    base_url, spans = traced
    trace_id, caller_span_id = secrets.token_hex(16), secrets.token_hex(8)
    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
        result = client.completions.create(
            model="builtin:tiny",
            prompt="trace me",
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
            extra_headers={"traceparent": f"00-{trace_id}-{caller_span_id}-01"},
        )

    def request_span(received):
        calls = [s for s in received if s.trace_id == trace_id and s.kind == SERVER_KIND and s.parent_span_id == caller_span_id]
        requests = [s for s in received if calls and s.parent_span_id == calls[0].span_id and s.name == "text_completion builtin:tiny"]
        return (calls[0], requests[0]) if requests else None

    def arrived(received) -> bool:
        spans_of = request_span(received)
        return spans_of is not None and len([s for s in received if s.parent_span_id == spans_of[1].span_id]) >= 4

    received = spans.wait_for(arrived)
    call, request = request_span(received)
    assert call.name == "POST /v1/completions" and call.service == "shardgate-gateway"
    assert call.attributes.get("http.response.status_code", call.attributes.get("http.status_code")) == 200
    stages = sorted(s.name for s in received if s.parent_span_id == request.span_id)
    assert stages == ["decode", "prefill", "queue", "validate"]
    attributes = request.attributes
    assert attributes["gen_ai.operation.name"] == "text_completion" and attributes["gen_ai.request.model"] == "builtin:tiny"
    assert attributes["gen_ai.usage.output_tokens"] == 4 == result.usage.completion_tokens
    assert attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert attributes["shardgate.protocol"] == "openai"
