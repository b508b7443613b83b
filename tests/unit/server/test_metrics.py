"""The metrics endpoint, and what the gateway installs for tracing."""

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from span_capture import capture_spans

from shardgate.proto.common import free_port
from shardgate.server.config import TelemetryConfig
from shardgate.server.metrics import Metrics
from shardgate.server.telemetry import Telemetry


def test_metrics_are_served_as_prometheus_text():
    metrics = Metrics()
    metrics.model = "m"
    metrics.prompt_tokens.labels("m").inc(7)
    port = free_port()
    server = metrics.serve("127.0.0.1", port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    prompt_tokens = samples["shardgate_prompt_tokens_total"]
    assert (prompt_tokens.value, prompt_tokens.labels) == (7, {"model": "m"})
    assert samples["process_resident_memory_bytes"].value > 0 and "python_info" in samples  # process and platform collectors


def test_a_taken_metrics_port_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Metrics().serve("127.0.0.1", port)


def test_the_grpc_instrumentation_is_installed_only_with_tracing():
    assert Telemetry(TelemetryConfig()).server_interceptors("shardgate.v1.Inference") == []
    provider, _ = capture_spans()
    [interceptor] = Telemetry(TelemetryConfig(), provider).server_interceptors("shardgate.v1.Inference")
    assert type(interceptor).__name__ == "OpenTelemetryAioServerInterceptor"
