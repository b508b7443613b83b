"""What the engine loops and the engine API report, and where it goes: spans, metrics, cost, logs.

Each replica's engine calls its `ReplicaTelemetry` around every step (`step_started`,
`step_finished`, `step_failed`, and `request_resumed` when a generation moves to it); the engine API opens each request's span with
`Telemetry.start_request` and calls `request_finished` once per generation request with its
final status, `request_rejected` for one refused before it reached a replica, and
`embed_finished` once per Embed call. The rest of the gateway knows nothing of Prometheus, and
of OpenTelemetry only the span it passes back here.

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
from shardgate.proto.tracing import init_tracing, inject_metadata, trace_ids
from shardgate.server.config import TelemetryConfig
from shardgate.server.cost import price, share_device_time
from shardgate.server.measures import GENAI_EMBEDDINGS, ReplicaStatus, RequestTimes, StepShape
from shardgate.server.metrics import Metrics
from shardgate.server.request import Request, SamplingParams
from shardgate.server.scheduler import StepPlan
from shardgate.server.tracing import (
    RESUME_EVENT,
    StepSampler,
    end_request_span,
    record_request_spans,
    records_step,
    request_attributes,
    request_parameters,
    resume_event_attributes,
    start_request_span,
    start_step_span,
)

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
    """gRPC metadata for the Step call: the step span's context as the global propagator writes it, when traced."""
    report_timings: bool
    """Ask every rank for its timings (for the per-rank metrics)."""


class Telemetry:
    """The gateway's tracer, metrics and prices, shared by every replica's engine."""

    def __init__(self, config: TelemetryConfig, tracer_provider: TracerProvider | None = None) -> None:
        self.config = config
        self.tracer_provider = tracer_provider
        self.tracer = tracer_provider.get_tracer("shardgate.server") if tracer_provider is not None else trace.NoOpTracer()
        self.metrics = Metrics()
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

    def server_interceptors(self, *services: str) -> list[grpc.aio.ServerInterceptor]:
        """The gRPC instrumentation that makes each call of the `services` a server span, joined
        to the caller's trace by the global propagator (none when tracing is off)."""
        if not self.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return [aio_server_interceptor(self.tracer_provider, filter_=filters.any_of(*map(filters.service_name, services)))]

    @property
    def model(self) -> str:
        return self.metrics.model

    def attach(self, model: str, replicas: Callable[[], Sequence[ReplicaStatus]]) -> None:
        """The served model (for GenAI attributes and the `model` label) and the replicas' state (for gauges)."""
        self.metrics.model = model
        self.metrics.watch(replicas)

    def replica(self, index: int, num_devices: int) -> ReplicaTelemetry:
        return ReplicaTelemetry(self, index, num_devices)

    def cost(self, device_seconds: float) -> float:
        return price(device_seconds, self.config.device_cost_per_hour)

    def start_request(self, operation: str, protocol: str) -> trace.Span:
        """A request's span, in the current context (the caller's: e.g. the gRPC server span)."""
        return start_request_span(self.tracer, operation, self.model, protocol)

    def request_validated(self, span: trace.Span, params: SamplingParams, stop: list[str]) -> None:
        if span.is_recording():
            span.set_attributes(request_parameters(params, stop))

    def request_rejected(
        self, request_id: str, operation: str, protocol: str, error_code: grpc.StatusCode, message: str, span: trace.Span
    ) -> None:
        """A request refused before it reached a replica (or an Embed call that failed); ends its span."""
        self.metrics.response(operation, error_code, protocol)
        self._log({"request_id": request_id, "operation": operation, "status": error_code.name, "protocol": protocol}, span)
        end_request_span(span, error_code, message)

    def request_finished(self, request: Request, replica: int, code: grpc.StatusCode, span: trace.Span) -> None:
        """A generation request served by replica `replica` ended (normally, failed, or
        cancelled: `code` is its status); ends its span."""
        now = time.monotonic()
        times = RequestTimes.of(request, now)
        cost = self.cost(request.device_seconds)
        if span.is_recording():
            record_request_spans(self.tracer, span, request, now)
            span.set_attributes(request_attributes(request, self.model, replica, times, cost))
        self.metrics.request_finished(request, times)
        self.metrics.response(request.operation, code, request.protocol)
        line = {
            "request_id": request.request_id,
            "operation": request.operation,
            "status": code.name,
            "protocol": request.protocol,
            "finish_reason": request.finish_reason.value if request.finish_reason else None,
            "replica": replica,
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": len(request.output_ids),
            "cached_tokens": request.num_cached_tokens,
            "preemptions": request.num_preemptions,
            "resumes": request.num_resumes,
            "queue_s": times.queue_s,
            "ttft_s": times.ttft_s,
            "tpot_s": times.tpot_s,
            "duration_s": times.duration_s,
            "device_seconds": request.device_seconds,
            "cost": cost,
        }
        self._log(line, span)
        end_request_span(span, code)

    def embed_finished(
        self, request_id: str, protocol: str, input_tokens: int, duration_s: float, code: grpc.StatusCode, message: str, span: trace.Span
    ) -> None:
        """An Embed call ended (`code` is its status); ends its span."""
        if span.is_recording():
            span.set_attributes({"gen_ai.response.id": request_id, "gen_ai.usage.input_tokens": input_tokens})
        self.metrics.embed_finished(protocol, input_tokens, duration_s, code is grpc.StatusCode.OK)
        self.metrics.response(GENAI_EMBEDDINGS, code, protocol)
        line = {"request_id": request_id, "operation": GENAI_EMBEDDINGS, "status": code.name, "protocol": protocol}
        self._log({**line, "prompt_tokens": input_tokens, "duration_s": duration_s}, span)
        end_request_span(span, code, message)

    def _log(self, fields: dict, span: trace.Span) -> None:
        """One line per request on the shardgate.requests logger: its fields as JSON (text
        logs), or as the JSON line itself (--log-format json)."""
        fields["trace_id"], fields["span_id"] = trace_ids(span)
        request_log.info("%s", json.dumps(fields), extra={"fields": fields})

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
            metadata = inject_metadata(trace.set_span_in_context(span))
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

    def request_resumed(self, span: trace.Span | None, request: Request, from_replica: int, cause: str) -> None:
        """A generation moved from replica from_replica to this one (and counts one more resume):
        an event on its span, the resume counter and the recompute histogram."""
        if span is not None and span.is_recording():
            span.add_event(RESUME_EVENT, resume_event_attributes(request, from_replica, self.index, cause))
        self.telemetry.metrics.request_resumed(cause, request.num_tokens)

    def step_failed(self, step: StepRecord, message: str) -> None:
        if step.span is not None:
            step.span.set_status(SpanStatus(SpanStatusCode.ERROR, message))
            step.span.end()
