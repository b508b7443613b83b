"""Logging set-up shared by the gateway and the shard processes: text lines, or one JSON object
per line (`--log-format json`) with the trace and span ids of the span current when the record
was made, for log pipelines that join logs to traces.

A record may carry structured fields (`extra={"fields": {...}}`, as the gateway's request log
does): a JSON line is then those fields (its message, their text rendering, is left out); a
text line shows the message only.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from opentelemetry import trace

from shardgate.proto.common import LOG_FORMATS

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message or fields,
    trace_id and span_id (when a span is current or the fields name them), exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        context = trace.get_current_span().get_span_context()
        if context.is_valid and not entry.get("trace_id"):
            entry["trace_id"], entry["span_id"] = f"{context.trace_id:032x}", f"{context.span_id:016x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str | int, log_format: str) -> None:
    """This process's root logger: `level`, to stderr, in `log_format` (text or json)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
