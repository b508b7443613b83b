"""Bad telemetry settings stop `shardgate serve` and a shard process at once: one line naming
the OTEL_* variable or the flag, a non-zero exit, no traceback."""

import os
import subprocess
import sys

import pytest

from shardgate.proto.common import SHARD_ERROR_PREFIX

BAD_SETTINGS = [
    ({"OTEL_TRACES_EXPORTER": "bogus"}, (), "OTEL_TRACES_EXPORTER='bogus' is not one of otlp, console, none"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "bogus"}, (), "OTEL_EXPORTER_OTLP_PROTOCOL='bogus' is not one of grpc, http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, (), "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='http/json' is not one of"),
    ({"OTEL_PROPAGATORS": "tracecontext,bogus"}, (), "OTEL_PROPAGATORS: 'bogus' is not an installed propagator"),
    ({}, ("--log-format", "yaml"), "--log-format must be one of text, json, not 'yaml'"),
]


def run(command: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")} | environ
    return subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("environ, flags, message", BAD_SETTINGS)
def test_serve_refuses_a_bad_telemetry_setting_in_one_line(environ, flags, message):
    result = run(["shardgate.clients.cli", "serve", "--port", "0", *flags], environ)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("shardgate serve: error: ") and message in line


@pytest.mark.parametrize("environ, flags, message", BAD_SETTINGS)
def test_a_shard_process_refuses_a_bad_telemetry_setting_in_one_line(environ, flags, message):
    result = run(["shardgate.shards.main", "--listen", "unix:///nonexistent/driver.sock", *flags], environ)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(SHARD_ERROR_PREFIX) and message in line
