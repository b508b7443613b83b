"""The gateway's spans: a request's stages under its gRPC server span, and one span per step.

A request's tree is the gRPC server span (made by OpenTelemetry's gRPC instrumentation, which
also joins the caller's trace from the `traceparent` metadata) → `validate` → `queue` →
`prefill` → `decode`. The stage spans are made when the request ends, from the times the
scheduler recorded (arrival, first step, first token, end), so the per-token path does no span
work; `decode` is one span for the whole decode.

A batch step is a trace of its own, serving many requests: its span links to their server
spans. It is started before the Step call, whose metadata carries it to the replica's driver,
and the shard ranks' spans hang beneath it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind

from shardgate.server.measures import GENAI_OPERATION, RequestTimes, StepShape
from shardgate.server.request import Request
from shardgate.server.scheduler import StepPlan

STEP_ID = "shardgate.step.id"


class StepSampler(Sampler):
    """The sampler configured by OTEL_TRACES_SAMPLER, except for step spans.

    The engine starts a step span only when --trace-steps says to record the step (for
    `sampled`, when a request in it is sampled), so a step span is always sampled, whatever
    ratio the configured sampler applies to new traces."""

    def __init__(self, base: Sampler) -> None:
        self.base = base

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None) -> SamplingResult:
        if attributes is not None and STEP_ID in attributes:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self.base.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"StepSampler{{{self.base.get_description()}}}"


def records_step(trace_steps: str, plan: StepPlan) -> bool:
    """Whether a step gets spans under --trace-steps (sampled, all or none)."""
    if trace_steps == "all":
        return True
    if trace_steps == "none":
        return False
    return any(c.request.span_context is not None and c.request.span_context.trace_flags.sampled for c in plan.chunks)


def start_step_span(tracer: trace.Tracer, plan: StepPlan, shape: StepShape, replica: int) -> trace.Span:
    """The span of one step, linked to the server spans of the requests it serves."""
    links = [Link(c.request.span_context) for c in plan.chunks if c.request.span_context is not None]
    attributes = {
        STEP_ID: plan.step_id,
        "shardgate.replica": replica,
        "shardgate.step.phase": shape.phase,
        "shardgate.step.batch_size": shape.batch_size,
        "shardgate.step.tokens": shape.tokens,
        "shardgate.step.prefill_tokens": shape.prefill_tokens,
        "shardgate.step.decode_tokens": shape.decode_tokens,
        "shardgate.step.preempted": len(plan.preempted),
    }
    return tracer.start_span("step", kind=SpanKind.CLIENT, links=links, attributes=attributes)


def _wall_ns() -> Callable[[float], int]:
    """Converts time.monotonic() readings to the epoch nanoseconds spans are stamped with."""
    offset = time.time_ns() - time.monotonic_ns()
    return lambda t: int(t * 1e9) + offset


def record_request_spans(tracer: trace.Tracer, server_span: trace.Span, request: Request, now: float) -> None:
    """The request's stage spans under its server span, stamped with the recorded times."""
    to_ns = _wall_ns()
    parent = trace.set_span_in_context(server_span)
    end = request.finished_at if request.finished_at is not None else now

    def stage(name: str, start: float, stop: float) -> None:
        tracer.start_span(name, parent, start_time=to_ns(start)).end(end_time=to_ns(stop))

    stage("queue", request.arrival, request.first_scheduled if request.first_scheduled is not None else end)
    if request.first_scheduled is not None:
        stage("prefill", request.first_scheduled, request.first_token if request.first_token is not None else end)
    if request.first_token is not None:
        stage("decode", request.first_token, end)


def request_attributes(request: Request, model: str, replica: int, times: RequestTimes, cost: float) -> dict:
    """GenAI semantic-convention attributes of a finished request, with its latencies and cost."""
    params = request.params
    attributes = {
        "gen_ai.operation.name": GENAI_OPERATION,
        "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": params.max_new_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.top_k": params.top_k,
        "gen_ai.request.seed": params.seed,
        "gen_ai.response.id": request.request_id,
        "gen_ai.usage.input_tokens": len(request.prompt_ids),
        "gen_ai.usage.output_tokens": len(request.output_ids),
        "gen_ai.response.finish_reasons": [request.finish_reason.value] if request.finish_reason else [],
        "gen_ai.latency.e2e": times.duration_s,
        "shardgate.preemptions": request.num_preemptions,
        "shardgate.replica": replica,
        "shardgate.device_seconds": request.device_seconds,
        "shardgate.cost": cost,
    }
    for name, value in (
        ("gen_ai.latency.time_in_queue", times.queue_s),
        ("gen_ai.latency.time_to_first_token", times.ttft_s),
        ("gen_ai.latency.time_per_output_token", times.tpot_s),
    ):
        if value is not None:
            attributes[name] = value
    return attributes
