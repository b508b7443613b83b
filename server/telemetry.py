"""What the engine loops and the engine API report, and where it goes: spans, metrics, cost, logs.

Each replica's engine calls its `ReplicaTelemetry` around every step (`step_started`,
`step_finished`, `step_failed`); the engine API calls `Telemetry.request_finished` once per
generation request with its final status, or `request_rejected` for one refused at validation.
The rest of the gateway knows nothing of OpenTelemetry or Prometheus.

With tracing off the tracer is OpenTelemetry's no-op one, no gRPC instrumentation is
installed, and the engine opens no step spans.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status as SpanStatus
from opentelemetry.trace import StatusCode as SpanStatusCode

from shardgate.proto import shard_pb2
from shardgate.proto.tracing import TRACEPARENT, init_tracing, traceparent
from shardgate.server.config import TelemetryConfig
from shardgate.server.cost import price, share_device_time
from shardgate.server.measures import RequestTimes, StepShape
from shardgate.server.metrics import Metrics
from shardgate.server.request import Request
from shardgate.server.scheduler import Scheduler, StepPlan
from shardgate.server.tracing import StepSampler, record_request_spans, records_step, request_attributes, start_step_span

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

request_log = logging.getLogger("shardgate.requests")


@dataclass
class StepRecord:
    """A step on its way to the replica."""

    plan: StepPlan
    shape: StepShape
    start: float
    """time.monotonic() just before the Step call."""
    span: trace.Span | None
    """The step's span, when the step is traced."""
    metadata: tuple[tuple[str, str], ...]
    """gRPC metadata for the Step call: the step span's traceparent, when traced."""
    report_timings: bool
    """Ask every rank for its timings (for the per-rank metrics)."""


class Telemetry:
    """The gateway's tracer, metrics and prices, shared by every replica's engine."""

    def __init__(self, config: TelemetryConfig, tracer_provider: TracerProvider | None = None) -> None:
        self.config = config
        self.tracer_provider = tracer_provider
        self.tracer = tracer_provider.get_tracer("shardgate.server") if tracer_provider is not None else trace.NoOpTracer()
        self.metrics = Metrics()
        self.model = ""
        self._metrics_server: WSGIServer | None = None

    @classmethod
    def start(cls, config: TelemetryConfig, host: str) -> Telemetry:
        """This process's tracing and metrics endpoint (once, in the gateway)."""
        telemetry = cls(config, init_tracing(config.tracing, "shardgate-gateway", StepSampler))
        if config.metrics_port:
            telemetry._metrics_server = telemetry.metrics.serve(host, config.metrics_port)
        return telemetry

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    def server_interceptors(self, service: str) -> list[grpc.aio.ServerInterceptor]:
        """The gRPC instrumentation that makes each call of `service` a server span, joined to
        the caller's trace by its traceparent metadata (none when tracing is off)."""
        if not self.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return [aio_server_interceptor(self.tracer_provider, filter_=filters.service_name(service))]

    def attach(self, model: str, schedulers: Callable[[], Sequence[Scheduler]]) -> None:
        """The served model (for GenAI attributes) and the replicas' schedulers (for gauges)."""
        self.model = model
        self.metrics.watch(schedulers)

    def replica(self, index: int, num_devices: int) -> ReplicaTelemetry:
        return ReplicaTelemetry(self, index, num_devices)

    def cost(self, device_seconds: float) -> float:
        return price(device_seconds, self.config.device_cost_per_hour)

    def request_rejected(self, request_id: str, code: grpc.StatusCode, protocol: str) -> None:
        """A generation request refused before it reached a replica."""
        self.metrics.response(code, protocol)
        request_log.info("%s", json.dumps({"request_id": request_id, "status": code.name, "trace_id": _trace_id(trace.get_current_span())}))

    def request_finished(self, request: Request, replica: int, code: grpc.StatusCode, server_span: trace.Span) -> None:
        """A generation request served by replica `replica` ended (normally, failed, or
        cancelled: `code` is its status)."""
        now = time.monotonic()
        times = RequestTimes.of(request, now)
        cost = self.cost(request.device_seconds)
        if server_span.is_recording():
            record_request_spans(self.tracer, server_span, request, now)
            server_span.set_attributes(request_attributes(request, self.model, replica, times, cost))
        self.metrics.request_finished(self.model, request, times)
        self.metrics.response(code, request.protocol)
        line = {
            "request_id": request.request_id,
            "status": code.name,
            "finish_reason": request.finish_reason.value if request.finish_reason else None,
            "replica": replica,
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": len(request.output_ids),
            "preemptions": request.num_preemptions,
            "queue_s": times.queue_s,
            "ttft_s": times.ttft_s,
            "tpot_s": times.tpot_s,
            "duration_s": times.duration_s,
            "device_seconds": request.device_seconds,
            "cost": cost,
            "trace_id": _trace_id(server_span),
        }
        request_log.info("%s", json.dumps(line))

    def close(self) -> None:
        """Stops the metrics endpoint and flushes the spans not yet exported."""
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()


class ReplicaTelemetry:
    """One replica's step accounting: step spans, step metrics, and device time per request."""

    def __init__(self, telemetry: Telemetry, index: int, num_devices: int) -> None:
        self.telemetry = telemetry
        self.index = index
        self.num_devices = num_devices

    def step_started(self, plan: StepPlan) -> StepRecord:
        telemetry = self.telemetry
        shape = StepShape.of(plan)
        span, metadata = None, ()
        if telemetry.tracing and records_step(telemetry.config.trace_steps, plan):
            span = start_step_span(telemetry.tracer, plan, shape, self.index)
            metadata = ((TRACEPARENT, traceparent(span)),)
        return StepRecord(plan, shape, time.monotonic(), span, metadata, telemetry.config.metrics_port > 0)

    def step_finished(self, step: StepRecord, response: shard_pb2.StepResponse) -> None:
        """Charges the step's device time to its requests and records the step."""
        wall = time.monotonic() - step.start
        device_seconds = wall * self.num_devices
        share_device_time(step.plan, device_seconds)
        cost = self.telemetry.cost(device_seconds)
        self.telemetry.metrics.step_finished(self.index, step.shape, wall, device_seconds, cost, response.rank_timings)
        if step.span is not None:
            step.span.set_attribute("shardgate.step.device_seconds", device_seconds)
            step.span.end()

    def step_failed(self, step: StepRecord, message: str) -> None:
        if step.span is not None:
            step.span.set_status(SpanStatus(SpanStatusCode.ERROR, message))
            step.span.end()


def _trace_id(span: trace.Span) -> str:
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else ""
