"""The gateway's spans: one per request, its stages beneath it, and one per batch step.

A request's span follows the OpenTelemetry GenAI semantic conventions: it is named
`{gen_ai.operation.name} {gen_ai.request.model}` (e.g. "text_completion builtin:tiny") and
carries gen_ai.request.*, gen_ai.response.*, gen_ai.usage.* and, on failure, error.type; our
own attributes are under `shardgate.`. The engine API opens it in the caller's context (for the
gRPC frontend, the call's server span, which OpenTelemetry's gRPC instrumentation makes and
joins to the caller's trace), so each request of a GenerateBidi stream has a span of its own.
Beneath it: `validate` → `queue` → `prefill` → `decode`. The stage spans are made when the
request ends, from the times the scheduler recorded (arrival, first step, first token, end), so
the per-token path does no span work; `decode` is one span for the whole decode. An Embed call
is a span of operation `embeddings`.

A batch step is a trace of its own, serving many requests: its span (a client span of the Step
RPC) links to their request spans. It is started before the Step call, whose metadata carries
it to the replica's driver, and the shard ranks' spans hang beneath it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace import Status as SpanStatus
from opentelemetry.trace import StatusCode as SpanStatusCode

from shardgate.proto.tracing import SHARD_STEP_RPC
from shardgate.server.measures import GENAI_PROVIDER, RequestTimes, StepShape
from shardgate.server.request import Request, SamplingParams
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
    """The span of one step, linked to the spans of the requests it serves."""
    links = [Link(c.request.span_context) for c in plan.chunks if c.request.span_context is not None]
    attributes = {
        **SHARD_STEP_RPC,
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


def start_request_span(tracer: trace.Tracer, operation: str, model: str, protocol: str) -> trace.Span:
    """A request's span, in the current context, named as the GenAI conventions name it."""
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": GENAI_PROVIDER,
        "gen_ai.request.model": model,
        "shardgate.protocol": protocol,
    }
    return tracer.start_span(f"{operation} {model}", kind=SpanKind.INTERNAL, attributes=attributes)


def end_request_span(span: trace.Span, code: grpc.StatusCode, message: str = "") -> None:
    """Ends a request's span with its status: error.type is the gRPC status code's name on failure."""
    if code is not grpc.StatusCode.OK:
        span.set_attribute("error.type", code.name)
        span.set_status(SpanStatus(SpanStatusCode.ERROR, message or code.name))
    span.end()


def record_request_spans(tracer: trace.Tracer, request_span: trace.Span, request: Request, now: float) -> None:
    """The request's stage spans under its span, stamped with the recorded times."""
    to_ns = _wall_ns()
    parent = trace.set_span_in_context(request_span)
    end = request.finished_at if request.finished_at is not None else now

    def stage(name: str, start: float, stop: float) -> None:
        tracer.start_span(name, parent, start_time=to_ns(start)).end(end_time=to_ns(stop))

    stage("queue", request.arrival, request.first_scheduled if request.first_scheduled is not None else end)
    if request.first_scheduled is not None:
        stage("prefill", request.first_scheduled, request.first_token if request.first_token is not None else end)
    if request.first_token is not None:
        stage("decode", request.first_token, end)


def request_parameters(params: SamplingParams, stop: list[str]) -> dict:
    """gen_ai.request.* attributes of a validated generation request (defaults applied)."""
    return {
        "gen_ai.request.max_tokens": params.max_new_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.top_k": params.top_k,
        "gen_ai.request.seed": params.seed,
        "gen_ai.request.stop_sequences": list(stop),
    }


RESUME_EVENT = "shardgate.resume"


def resume_event_attributes(request: Request, from_replica: int, to_replica: int, cause: str) -> dict:
    """The attributes of a request span's event for one resume: the replicas involved, why it
    moved, and what the new replica computes again."""
    return {
        "shardgate.resume.from_replica": from_replica,
        "shardgate.resume.to_replica": to_replica,
        "shardgate.resume.cause": cause,
        "shardgate.resume.generated_tokens": len(request.output_ids),
        "shardgate.resume.recompute_tokens": request.num_tokens,
        "shardgate.resume.number": request.num_resumes,
    }


def request_attributes(request: Request, model: str, replica: int, times: RequestTimes, cost: float) -> dict:
    """gen_ai.response.* and gen_ai.usage.* attributes of a finished request, with its latencies and cost."""
    attributes = {
        "gen_ai.response.id": request.request_id,
        "gen_ai.response.model": model,
        "gen_ai.response.finish_reasons": [request.finish_reason.value] if request.finish_reason else [],
        "gen_ai.usage.input_tokens": len(request.prompt_ids),
        "gen_ai.usage.output_tokens": len(request.output_ids),
        "shardgate.latency.e2e": times.duration_s,
        "shardgate.preemptions": request.num_preemptions,
        "shardgate.resumes": request.num_resumes,
        "shardgate.cached_tokens": request.num_cached_tokens,
        "shardgate.replica": replica,
        "shardgate.device_seconds": request.device_seconds,
        "shardgate.cost": cost,
    }
    for name, value in (
        ("shardgate.latency.time_in_queue", times.queue_s),
        ("shardgate.latency.time_to_first_token", times.ttft_s),
        ("shardgate.latency.time_per_output_token", times.tpot_s),
    ):
        if value is not None:
            attributes[name] = value
    return attributes
