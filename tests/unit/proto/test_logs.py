"""Log lines as text or JSON, with the current span's ids."""

import json
import logging
import sys

import pytest
from span_capture import capture_spans

from shardgate.proto.logs import JsonFormatter, configure_logging


def record(message: str = "hello %s", args=("world",), **extra) -> logging.LogRecord:
    made = logging.LogRecord("shardgate.test", logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_json_line_has_the_current_spans_ids():
    provider, _ = capture_spans()
    with provider.get_tracer("t").start_as_current_span("s") as span:
        line = json.loads(JsonFormatter().format(record()))
    context = span.get_span_context()
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "shardgate.test", "hello world")
    assert (line["trace_id"], line["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert line["time"].endswith("+00:00")


def test_a_json_line_of_a_record_with_fields_is_those_fields():
    line = json.loads(
        JsonFormatter().format(record("%s", ("{}",), fields={"request_id": "r1", "trace_id": "ab" * 16, "span_id": "cd" * 8}))
    )
    assert "message" not in line and line["request_id"] == "r1" and line["trace_id"] == "ab" * 16
    assert "trace_id" not in json.loads(JsonFormatter().format(record()))  # no span current, none given


def test_a_json_line_carries_the_exception():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = record(exc_info=sys.exc_info())
    line = json.loads(JsonFormatter().format(failed))
    assert "RuntimeError: boom" in line["exception"] and "\n" not in JsonFormatter().format(failed)


def test_an_unknown_log_format_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="^--log-format must be one of text, json, not 'yaml'"):
        configure_logging("INFO", "yaml")
