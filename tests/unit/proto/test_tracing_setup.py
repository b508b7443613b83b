"""Tracing exporters from the standard OTEL_* environment (bad values refused); context in and out of processes."""

import argparse

import pytest
from opentelemetry import baggage, trace
from span_capture import capture_spans

from shardgate.proto.common import TracingConfig
from shardgate.proto.tracing import context_from_traceparent, extract_metadata, init_tracing, inject_metadata, traceparent
from shardgate.server import cli
from shardgate.server.config import TelemetryConfig

GRPC, HTTP = "otlp_proto_grpc", "otlp_proto_http"


@pytest.mark.parametrize(
    "environ, exporters",
    [
        ({}, ()),  # nothing asked for: no tracing
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, (GRPC,)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4318/v1/traces", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, (HTTP,)),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, (HTTP,)),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
            (GRPC,),
        ),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, (GRPC, "console")),
        ({"OTEL_TRACES_EXPORTER": "otlp_proto_http"}, (HTTP,)),  # an installed exporter, by its entry-point name
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_SDK_DISABLED": "True"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_TRACES_EXPORTER": "none"}, ()),
        ({"OTEL_PROPAGATORS": "tracecontext,baggage", "OTEL_TRACES_EXPORTER": "console"}, ("console",)),
    ],
)
def test_exporters_come_from_the_standard_environment(environ, exporters):
    config = TracingConfig.from_environ(environ)
    assert (config.exporters, config.enabled) == (exporters, bool(exporters))


@pytest.mark.parametrize(
    "environ, variable",
    [
        ({"OTEL_TRACES_EXPORTER": "bogus"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp,jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "bogus"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ({"OTEL_PROPAGATORS": "tracecontext,b3"}, "OTEL_PROPAGATORS"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(environ, variable):
    with pytest.raises(ValueError, match=f"^{variable}"):
        TracingConfig.from_environ(environ)


def test_tracing_off_makes_no_provider():
    assert init_tracing(TracingConfig(), "x") is None


def test_each_exporter_is_the_one_its_package_registers(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:1/v1/traces")
    provider = init_tracing(TracingConfig((HTTP, "console")), "svc")
    try:
        exporters = [processor.span_exporter for processor in provider._active_span_processor._span_processors]
        assert [type(e).__module__ for e in exporters] == [
            "opentelemetry.exporter.otlp.proto.http.trace_exporter",
            "opentelemetry.sdk.trace.export",
        ]
        assert provider.resource.attributes["service.name"] == "svc"
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    "field, value",
    [
        ("trace_steps", "some"),
        ("metrics_port", -1),
        ("metrics_port", 70000),
        ("device_cost_per_hour", -1.0),
        ("device_cost_per_hour", float("inf")),
        ("log_format", "yaml"),
    ],
)
def test_telemetry_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field.replace("_", "[-_]")):
        TelemetryConfig(**{field: value})


def test_cli_flags_and_environment_make_the_telemetry_config(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--metrics-port", "9400", "--trace-steps", "all", "--device-cost-per-hour", "2.5"])
    telemetry = cli.config_from_args(args).telemetry
    assert telemetry == TelemetryConfig(TracingConfig(("otlp_proto_grpc",)), "all", 9400, 2.5)
    assert cli.config_from_args(parser.parse_args([])).telemetry.metrics_port == 0  # no endpoint unless asked


def test_traceparent_round_trip():
    provider, _ = capture_spans()
    span = provider.get_tracer("t").start_span("s")
    remote = trace.get_current_span(context_from_traceparent(traceparent(span))).get_span_context()
    assert (remote.trace_id, remote.span_id, remote.is_remote) == (span.get_span_context().trace_id, span.get_span_context().span_id, True)


def test_metadata_carries_the_context_and_baggage_through_the_global_propagator():
    provider, _ = capture_spans()
    span = provider.get_tracer("t").start_span("s")
    context = baggage.set_baggage("tenant", "acme", trace.set_span_in_context(span))
    metadata = inject_metadata(context)
    assert {key for key, _ in metadata} == {"traceparent", "baggage"}
    extracted = extract_metadata([("x", "y"), ("bin-bin", b"\x00"), *metadata])
    remote = trace.get_current_span(extracted).get_span_context()
    assert (remote.trace_id, remote.span_id) == (span.get_span_context().trace_id, span.get_span_context().span_id)
    assert baggage.get_baggage("tenant", extracted) == "acme"
    assert extract_metadata([("x", "y")]) is None
