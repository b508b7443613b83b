"""The engine's and handlers' hooks: step spans and their context, device time, metrics, logs."""

import json
import logging

import grpc
import pytest
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanContext, StatusCode, TraceFlags
from span_capture import capture_spans

from shardgate.proto import shard_pb2
from shardgate.proto.tracing import extract_metadata
from shardgate.server.block_manager import BlockManager
from shardgate.server.config import SchedulerConfig, TelemetryConfig
from shardgate.server.measures import ReplicaStatus
from shardgate.server.request import FinishReason, Request, SamplingParams
from shardgate.server.scheduler import Scheduler
from shardgate.server.telemetry import Telemetry
from shardgate.server.tracing import StepSampler

PARAMS = SamplingParams(8, 0.0, 1.0, 0, 0, False, False)
SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def scheduled(num_requests: int, sampled: bool = True) -> tuple[Scheduler, list[Request], object]:
    """A scheduler with requests of 5, 6, ... prompt tokens (sharing no prefix), and its first plan."""
    scheduler = Scheduler(SchedulerConfig(), BlockManager(64, 4))
    requests = [Request(i + 1, f"r{i + 1}", [i + 1] * (5 + i), PARAMS) for i in range(num_requests)]
    for request in requests:
        request.span_context = SpanContext(request.seq_id, request.seq_id, False, SAMPLED if sampled else TraceFlags(0))
        scheduler.add(request)
    return scheduler, requests, scheduler.schedule()


STEPS_ONLY = StepSampler(ParentBased(ALWAYS_OFF))
"""Records nothing but step spans."""


def traced_telemetry(sampler=STEPS_ONLY, **config) -> tuple[Telemetry, object]:
    """Tracing on, by default with a sampler that records nothing but step spans."""
    provider, exporter = capture_spans(sampler)
    return Telemetry(TelemetryConfig(**config), provider), exporter


def sample(metrics, name, **labels) -> float:
    """A sample's value; every series of ours has the model label, "" until attach()."""
    labels = {"model": metrics.model, **labels}
    return metrics.registry.get_sample_value(name, {k: str(v) for k, v in labels.items()}) or 0.0


def test_a_traced_step_carries_its_span_to_the_replica_and_charges_its_requests():
    telemetry, exporter = traced_telemetry(metrics_port=9999)
    replica = telemetry.replica(1, num_devices=4)
    _, requests, plan = scheduled(2)
    step = replica.step_started(plan)
    assert step.report_timings  # metrics are served: ask the ranks for their timings
    traceparent = dict(step.metadata)["traceparent"]  # the default propagators: W3C trace context and baggage
    assert extract_metadata(step.metadata) is not None
    timings = [
        shard_pb2.RankTiming(
            rank=r, forward_s=0.01 * (r + 1), all_reduce_s=0.002, weights_bytes=1000, kv_cache_bytes=2000 + r, device_memory_free_bytes=5
        )
        for r in range(4)
    ]
    replica.step_finished(step, shard_pb2.StepResponse(rank_timings=timings))

    [span] = exporter.get_finished_spans()
    assert span.name == "step" and span.attributes["rpc.system"] == "grpc" and span.attributes["rpc.method"] == "Step"
    assert span.attributes["rpc.service"] == "shardgate.shard.v1.Shard"
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (trace_id, span_id) == (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}") and int(flags, 16) & 1  # sampled
    device_seconds = span.attributes["shardgate.step.device_seconds"]
    assert 0 < device_seconds <= 4 * (span.end_time - span.start_time) / 1e9  # 4 devices for the step's wall time
    assert [r.device_seconds for r in requests] == pytest.approx([device_seconds * 5 / 11, device_seconds * 6 / 11])
    metrics = telemetry.metrics
    assert sample(metrics, "shardgate_step_duration_seconds_count", replica=1, phase="prefill") == 1
    assert (
        sample(metrics, "shardgate_step_tokens_sum", replica=1) == 11 and sample(metrics, "shardgate_step_batch_size_sum", replica=1) == 2
    )
    assert sample(metrics, "shardgate_device_seconds_total", replica=1) == pytest.approx(device_seconds)
    assert sample(metrics, "shardgate_rank_forward_seconds_sum", replica=1, rank=3) == pytest.approx(0.04)
    assert sample(metrics, "shardgate_rank_communication_seconds_sum", replica=1, rank=2, op="all_reduce") == pytest.approx(0.002)
    assert sample(metrics, "shardgate_rank_communication_seconds_count", replica=1, rank=2, op="pp_recv") == 1
    assert sample(metrics, "shardgate_rank_memory_bytes", replica=1, rank=3, kind="kv_cache") == 2003
    assert sample(metrics, "shardgate_rank_memory_bytes", replica=1, rank=0, kind="weights") == 1000
    assert sample(metrics, "shardgate_rank_device_memory_free_bytes", replica=1, rank=2) == 5


@pytest.mark.parametrize("trace_steps, sampled", [("none", True), ("sampled", False)])
def test_an_untraced_step_has_no_span_and_no_context(trace_steps, sampled):
    telemetry, exporter = traced_telemetry(trace_steps=trace_steps)
    _, requests, plan = scheduled(1, sampled)
    step = telemetry.replica(0, 1).step_started(plan)
    assert step.span is None and step.metadata == () and not step.report_timings
    telemetry.replica(0, 1).step_finished(step, shard_pb2.StepResponse())
    assert exporter.get_finished_spans() == () and requests[0].device_seconds > 0


def test_without_tracing_steps_are_still_charged():
    telemetry = Telemetry(TelemetryConfig(trace_steps="all"))
    _, requests, plan = scheduled(1)
    step = telemetry.replica(0, 2).step_started(plan)
    assert step.span is None and step.metadata == ()
    telemetry.replica(0, 2).step_finished(step, shard_pb2.StepResponse())
    assert requests[0].device_seconds == pytest.approx(sample(telemetry.metrics, "shardgate_device_seconds_total", replica=0))


def test_a_failed_step_span_ends_with_an_error():
    telemetry, exporter = traced_telemetry()
    _, _, plan = scheduled(1)
    replica = telemetry.replica(0, 1)
    replica.step_failed(replica.step_started(plan), "shard died")
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "shard died"


def finish(scheduler: Scheduler, request: Request) -> Request:
    scheduler.update(scheduler.schedule(), {request.seq_id: (65, 0.0)})
    request.output_ids.append(66)
    scheduler.finish(request, FinishReason.LENGTH)
    return request


def test_a_finished_request_gets_its_spans_metrics_and_one_log_line(caplog):
    telemetry, exporter = traced_telemetry(sampler=None, device_cost_per_hour=36.0)
    telemetry.attach("m", list)
    scheduler, [request], _ = scheduled(1)
    request.device_seconds = 0.5
    finish(scheduler, request)
    with caplog.at_level(logging.INFO, logger="shardgate.requests"):
        span = telemetry.start_request("text_completion", "grpc")
        telemetry.request_validated(span, PARAMS, ["\n\n"])
        telemetry.request_finished(request, 0, grpc.StatusCode.OK, span)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["decode", "prefill", "queue", "text_completion m"]
    attributes = spans["text_completion m"].attributes
    assert attributes["gen_ai.operation.name"] == "text_completion" and attributes["gen_ai.provider.name"] == "shardgate"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "m"
    assert attributes["gen_ai.request.max_tokens"] == 8 and attributes["gen_ai.request.stop_sequences"] == ("\n\n",)
    assert attributes["gen_ai.usage.output_tokens"] == 2 and attributes["shardgate.cost"] == pytest.approx(0.005)
    assert "error.type" not in attributes and spans["text_completion m"].status.status_code is StatusCode.UNSET
    metrics = telemetry.metrics
    assert sample(metrics, "shardgate_responses_total", gen_ai_operation_name="text_completion", code="OK", protocol="grpc") == 1
    assert sample(metrics, "shardgate_requests_finished_total", finished_reason="length") == 1
    assert sample(metrics, "shardgate_prompt_tokens_total") == 5 and sample(metrics, "shardgate_generation_tokens_total") == 2
    assert sample(metrics, "shardgate_request_prompt_tokens_sum") == 5 and sample(metrics, "shardgate_request_generation_tokens_sum") == 2
    assert (
        sample(metrics, "shardgate_request_prefill_time_seconds_count")
        == sample(metrics, "shardgate_request_decode_time_seconds_count")
        == 1
    )
    assert sample(metrics, "shardgate_inter_token_latency_seconds_count") == 0  # the second token was appended by hand
    genai = dict(gen_ai_operation_name="text_completion", gen_ai_request_model="m", protocol="grpc")
    assert sample(metrics, "gen_ai_server_time_per_output_token_seconds_count", **genai) == 1
    [record] = caplog.records
    line = json.loads(record.getMessage())
    assert line["request_id"] == "r1" and line["status"] == "OK" and line["finish_reason"] == "length"
    assert (line["prompt_tokens"], line["completion_tokens"], line["cost"]) == (5, 2, pytest.approx(0.005))
    context = spans["text_completion m"].context
    assert (line["trace_id"], line["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert record.fields == line  # a JSON log line is these fields


def test_a_failed_request_span_has_its_error_type():
    telemetry, exporter = traced_telemetry(sampler=None)
    telemetry.attach("m", list)
    span = telemetry.start_request("chat", "openai")
    telemetry.request_rejected("bad-1", "chat", "openai", grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens: too many", span)
    [ended] = exporter.get_finished_spans()
    assert ended.name == "chat m" and ended.attributes["error.type"] == "INVALID_ARGUMENT"
    assert ended.attributes["shardgate.protocol"] == "openai" and ended.status.description == "max_new_tokens: too many"
    labels = dict(gen_ai_operation_name="chat", code="INVALID_ARGUMENT", protocol="openai")
    assert sample(telemetry.metrics, "shardgate_responses_total", **labels) == 1


def test_an_embed_call_gets_its_span_and_metrics():
    telemetry, exporter = traced_telemetry(sampler=None)
    telemetry.attach("m", list)
    telemetry.embed_finished("e1", "grpc", 12, 0.25, grpc.StatusCode.OK, "", telemetry.start_request("embeddings", "grpc"))
    [ended] = exporter.get_finished_spans()
    assert ended.name == "embeddings m" and ended.attributes["gen_ai.usage.input_tokens"] == 12
    metrics = telemetry.metrics
    genai = dict(gen_ai_operation_name="embeddings", gen_ai_request_model="m", protocol="grpc")
    assert sample(metrics, "gen_ai_server_request_duration_seconds_sum", **genai) == 0.25
    assert sample(metrics, "shardgate_embed_input_tokens_total") == 12
    assert sample(metrics, "shardgate_responses_total", gen_ai_operation_name="embeddings", code="OK", protocol="grpc") == 1


def test_without_tracing_a_finished_request_still_counts_and_logs(caplog):
    telemetry = Telemetry(TelemetryConfig())
    scheduler, [request], _ = scheduled(1)
    with caplog.at_level(logging.INFO, logger="shardgate.requests"):
        telemetry.request_finished(
            finish(scheduler, request), 0, grpc.StatusCode.CANCELLED, telemetry.start_request("text_completion", "grpc")
        )
        telemetry.request_rejected(
            "bad-1", "text_completion", "grpc", grpc.StatusCode.INVALID_ARGUMENT, "bad", telemetry.start_request("text_completion", "grpc")
        )
    responses = dict(gen_ai_operation_name="text_completion", protocol="grpc")
    assert sample(telemetry.metrics, "shardgate_responses_total", code="CANCELLED", **responses) == 1
    assert sample(telemetry.metrics, "shardgate_responses_total", code="INVALID_ARGUMENT", **responses) == 1
    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert [(line["request_id"], line["status"], line["trace_id"]) for line in lines] == [
        ("r1", "CANCELLED", ""),
        ("bad-1", "INVALID_ARGUMENT", ""),
    ]


def replica_status(scheduler: Scheduler, healthy: bool = True, restarts: int = 0) -> ReplicaStatus:
    return ReplicaStatus(scheduler.status(), 0, 0, healthy, restarts)


def test_replica_state_is_read_when_scraped():
    telemetry = Telemetry(TelemetryConfig())
    scheduler, _, _ = scheduled(2)  # both running, 4 of 64 blocks in use
    idle = Scheduler(SchedulerConfig(), BlockManager(8, 4))
    idle.add(Request(9, "r9", [1], PARAMS))
    telemetry.attach("m", lambda: [replica_status(scheduler), replica_status(idle, healthy=False, restarts=2)])
    metrics = telemetry.metrics
    assert sample(metrics, "shardgate_requests_running", replica=0) == 2 and sample(metrics, "shardgate_requests_waiting", replica=1) == 1
    assert sample(metrics, "shardgate_kv_cache_usage_ratio", replica=0) == 4 / 64
    assert sample(metrics, "shardgate_kv_cache_usage_ratio", replica=1) == 0
    scheduler.num_preemptions = 3
    assert sample(metrics, "shardgate_preemptions_total", replica=0) == 3
    assert sample(metrics, "shardgate_prefix_cache_query_tokens_total", replica=0) == 5 + 6  # both prompts looked up
    assert sample(metrics, "shardgate_prefix_cache_hit_tokens_total", replica=0) == 0
    again = Request(3, "r3", [1] * 5, PARAMS)  # the first request's prompt: its full block is cached
    scheduler.add(again)
    scheduler.schedule()
    assert sample(metrics, "shardgate_prefix_cache_query_tokens_total", replica=0) == 5 + 6 + 5
    assert sample(metrics, "shardgate_prefix_cache_hit_tokens_total", replica=0) == 4
    assert sample(metrics, "shardgate_replica_healthy", replica=0) == 1 and sample(metrics, "shardgate_replica_healthy", replica=1) == 0
    assert sample(metrics, "shardgate_replica_restarts_total", replica=1) == 2
    assert metrics.registry.get_sample_value("process_cpu_seconds_total") > 0  # prometheus_client's process collector


def test_a_resume_is_an_event_on_the_request_span_a_count_and_its_recompute_tokens():
    telemetry, exporter = traced_telemetry(ALWAYS_ON)
    span = telemetry.start_request("text_completion", "grpc")
    request = Request(7, "r7", [1] * 5, PARAMS, output_ids=[9] * 20, num_resumes=1)
    telemetry.replica(1, num_devices=1).request_resumed(span, request, from_replica=0, cause="failure")
    span.end()
    (finished,) = exporter.get_finished_spans()
    (event,) = finished.events
    assert event.name == "shardgate.resume"
    assert dict(event.attributes) == {
        "shardgate.resume.from_replica": 0,
        "shardgate.resume.to_replica": 1,
        "shardgate.resume.cause": "failure",
        "shardgate.resume.generated_tokens": 20,
        "shardgate.resume.recompute_tokens": 25,
        "shardgate.resume.number": 1,
    }
    metrics = telemetry.metrics
    assert sample(metrics, "shardgate_resumed_generations_total", cause="failure") == 1
    assert sample(metrics, "shardgate_resume_recompute_tokens_sum") == 25
