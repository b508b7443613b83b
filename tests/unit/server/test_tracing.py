"""The gateway's spans: step sampling, a request's stage spans from recorded times, attributes."""

import time

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import SpanContext, TraceFlags
from span_capture import capture_spans

from shardgate.server.measures import RequestTimes, StepShape
from shardgate.server.request import FinishReason, Request, SamplingParams
from shardgate.server.scheduler import ScheduledChunk, StepPlan
from shardgate.server.tracing import (
    StepSampler,
    end_request_span,
    record_request_spans,
    records_step,
    request_attributes,
    request_parameters,
    start_request_span,
    start_step_span,
)

PARAMS = SamplingParams(16, 0.7, 0.9, 40, 1234, False, False)


def traced_request(seq_id: int, sampled: bool | None) -> Request:
    """A request whose call span is sampled, unsampled, or absent (None: tracing off)."""
    request = Request(seq_id, f"r{seq_id}", [1, 2, 3], PARAMS)
    if sampled is not None:
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        request.span_context = SpanContext(seq_id, seq_id + 100, is_remote=False, trace_flags=flags)
    return request


def plan_of(*requests: Request) -> StepPlan:
    return StepPlan(7, [ScheduledChunk(r, 0, 3, [], True, True) for r in requests])


@pytest.mark.parametrize(
    "mode, sampled, recorded",
    [
        ("sampled", [False, True], True),
        ("sampled", [False, None], False),
        ("all", [None, False], True),
        ("none", [True], False),
    ],
)
def test_which_steps_are_recorded(mode, sampled, recorded):
    assert records_step(mode, plan_of(*(traced_request(i + 1, s) for i, s in enumerate(sampled)))) is recorded


def test_step_spans_are_sampled_whatever_the_configured_sampler_says():
    provider, exporter = capture_spans(StepSampler(ParentBased(ALWAYS_OFF)))
    tracer = provider.get_tracer("test")
    tracer.start_span("some request").end()
    plan = plan_of(traced_request(1, True), traced_request(2, False), traced_request(3, None))
    start_step_span(tracer, plan, StepShape.of(plan), replica=1).end()
    [step] = exporter.get_finished_spans()
    assert step.name == "step" and step.kind is trace.SpanKind.CLIENT and step.parent is None
    assert [(link.context.trace_id, link.context.span_id) for link in step.links] == [(1, 101), (2, 102)]
    assert step.attributes["shardgate.step.id"] == 7 and step.attributes["shardgate.replica"] == 1
    assert step.attributes["shardgate.step.phase"] == "prefill" and step.attributes["shardgate.step.batch_size"] == 3
    assert step.attributes["shardgate.step.tokens"] == 9


def finished_request(first_scheduled=None, first_token=None, outputs=0) -> Request:
    now = time.monotonic()
    request = Request(1, "r1", [1, 2, 3], PARAMS, arrival=now - 2.0)
    request.first_scheduled = None if first_scheduled is None else now - 2.0 + first_scheduled
    request.first_token = None if first_token is None else now - 2.0 + first_token
    request.output_ids = [5] * outputs
    request.finished_at = now - 0.5
    return request


def stage_spans(request: Request) -> tuple[object, dict]:
    provider, exporter = capture_spans()
    tracer = provider.get_tracer("test")
    call = tracer.start_span("call", start_time=time.time_ns() - 3_000_000_000)
    record_request_spans(tracer, call, request, now=time.monotonic())
    call.end()
    spans = exporter.get_finished_spans()
    call_span = next(s for s in spans if s.name == "call")
    return call_span, {s.name: s for s in spans if s.name != "call"}


def test_stage_spans_follow_the_recorded_times_under_the_call():
    call, stages = stage_spans(finished_request(first_scheduled=0.25, first_token=0.75, outputs=4))
    assert list(stages) == ["queue", "prefill", "decode"]
    assert all(s.parent.span_id == call.context.span_id and s.context.trace_id == call.context.trace_id for s in stages.values())
    durations = {name: (s.end_time - s.start_time) / 1e9 for name, s in stages.items()}
    assert durations == pytest.approx({"queue": 0.25, "prefill": 0.5, "decode": 0.75}, abs=1e-6)
    assert stages["queue"].end_time == stages["prefill"].start_time and stages["prefill"].end_time == stages["decode"].start_time
    assert all(call.start_time <= s.start_time <= s.end_time <= call.end_time for s in stages.values())


@pytest.mark.parametrize(
    "first_scheduled, first_token, names",
    [(None, None, ["queue"]), (0.25, None, ["queue", "prefill"])],
)
def test_stage_spans_of_a_request_that_ended_early(first_scheduled, first_token, names):
    _, stages = stage_spans(finished_request(first_scheduled, first_token))
    assert list(stages) == names
    assert max(s.end_time for s in stages.values()) - min(s.start_time for s in stages.values()) == pytest.approx(1.5e9, abs=1e3)


def test_request_attributes_follow_the_genai_conventions():
    request = finished_request(first_scheduled=0.25, first_token=0.75, outputs=4)
    request.finish_reason = FinishReason.LENGTH
    request.num_preemptions = 1
    request.num_resumes = 2
    request.device_seconds = 0.125
    attributes = request_attributes(request, "m", replica=2, times=RequestTimes.of(request, time.monotonic()), cost=0.5)
    latencies = {name: attributes.pop(name) for name in list(attributes) if name.startswith("shardgate.latency.")}
    assert latencies == pytest.approx(
        {
            "shardgate.latency.e2e": 1.5,
            "shardgate.latency.time_in_queue": 0.25,
            "shardgate.latency.time_to_first_token": 0.75,
            "shardgate.latency.time_per_output_token": 0.25,
        },
        abs=1e-6,
    )
    assert attributes == {
        "gen_ai.response.id": "r1",
        "gen_ai.response.model": "m",
        "gen_ai.usage.input_tokens": 3,
        "gen_ai.usage.output_tokens": 4,
        "gen_ai.response.finish_reasons": ["length"],
        "shardgate.preemptions": 1,
        "shardgate.resumes": 2,
        "shardgate.cached_tokens": 0,
        "shardgate.replica": 2,
        "shardgate.device_seconds": 0.125,
        "shardgate.cost": 0.5,
    }
    assert request_parameters(PARAMS, ["END"]) == {
        "gen_ai.request.max_tokens": 16,
        "gen_ai.request.temperature": 0.7,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.top_k": 40,
        "gen_ai.request.seed": 1234,
        "gen_ai.request.stop_sequences": ["END"],
    }


def test_a_request_span_is_named_by_its_operation_and_model():
    provider, exporter = capture_spans()
    span = start_request_span(provider.get_tracer("test"), "text_completion", "builtin:tiny", "grpc")
    end_request_span(span, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")
    [ended] = exporter.get_finished_spans()
    assert ended.name == "text_completion builtin:tiny" and ended.attributes["error.type"] == "DEADLINE_EXCEEDED"
    assert ended.attributes["gen_ai.provider.name"] == "shardgate" and ended.status.description == "deadline passed"
