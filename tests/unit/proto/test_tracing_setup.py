"""Tracing switches from the standard environment; W3C context in and out of processes."""

import argparse

import pytest
from opentelemetry import trace
from span_capture import capture_spans

from shardgate.proto.common import TracingConfig
from shardgate.proto.tracing import context_from_metadata, context_from_traceparent, init_tracing, traceparent
from shardgate.server import cli
from shardgate.server.config import TelemetryConfig


@pytest.mark.parametrize(
    "environ, endpoint, enabled",
    [
        ({}, "", False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "http://collector:4317", True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4317"}, "http://b:4317", True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_SDK_DISABLED": "True"}, "http://a:4317", False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_TRACES_EXPORTER": "none"}, "http://a:4317", False),
    ],
)
def test_tracing_is_on_with_an_endpoint_unless_disabled(environ, endpoint, enabled):
    config = TracingConfig.from_environ(environ)
    assert (config.endpoint, config.enabled) == (endpoint, enabled)


def test_tracing_off_makes_no_provider():
    assert init_tracing(TracingConfig(endpoint="http://127.0.0.1:1", disabled=True), "x") is None
    assert init_tracing(TracingConfig(), "x") is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("trace_steps", "some"),
        ("metrics_port", -1),
        ("metrics_port", 70000),
        ("device_cost_per_hour", -1.0),
        ("device_cost_per_hour", float("inf")),
    ],
)
def test_telemetry_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TelemetryConfig(**{field: value})


def test_cli_flags_and_environment_make_the_telemetry_config(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--metrics-port", "9400", "--trace-steps", "all", "--device-cost-per-hour", "2.5"])
    telemetry = cli.config_from_args(args).telemetry
    assert telemetry == TelemetryConfig(TracingConfig("http://collector:4317"), "all", 9400, 2.5)
    assert cli.config_from_args(parser.parse_args([])).telemetry.metrics_port == 0  # no endpoint unless asked


def test_traceparent_round_trip():
    provider, _ = capture_spans()
    span = provider.get_tracer("t").start_span("s")
    value = traceparent(span)
    for context in (context_from_traceparent(value), context_from_metadata([("x", "y"), ("traceparent", value)])):
        remote = trace.get_current_span(context).get_span_context()
        assert (remote.trace_id, remote.span_id, remote.is_remote) == (
            span.get_span_context().trace_id,
            span.get_span_context().span_id,
            True,
        )
    assert context_from_metadata([("x", "y")]) is None
