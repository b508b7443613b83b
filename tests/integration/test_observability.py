"""Traces, metrics, cost and logs of a real gateway with a TP=2 replica.

The processes export spans over OTLP to real receivers in this process (tests/otlp_receiver.py:
OTLP/gRPC for the module's server, OTLP/HTTP for one started to compare); metrics are scraped
from --metrics-port and parsed with prometheus-client's parser; logs are JSON lines
(--log-format json), the gateway's and the shards'.
"""

import json
import secrets
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from otlp_receiver import ReceivedSpan, SpanStore, otlp_http_receiver, otlp_receiver
from prometheus_client.parser import text_string_to_metric_families
from servers import RunningServer, start_server

from shardgate.clients import build_request
from shardgate.clients.messages import bidi_generate, build_embed_request
from shardgate.proto import inference_pb2_grpc
from shardgate.proto.common import free_port

PRICE_PER_DEVICE_HOUR = 7.2
STREAM = "/shardgate.v1.Inference/GenerateStream"
REQUEST = "text_completion builtin:tiny"  # the GenAI conventions' span name: {operation} {model}
DRIVER_STEP = "shardgate.shard.v1.Shard/Step"
INTERNAL, SERVER, CLIENT = 1, 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
LAYERS = 4  # builtin:tiny
MODEL = "builtin:tiny"
GENAI_LABELS = {"gen_ai_operation_name": "text_completion", "gen_ai_request_model": MODEL, "protocol": "grpc"}
OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_SERVICE_NAME",
    "OTEL_PROPAGATORS",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
)


def traced_environment(env: pytest.MonkeyPatch, endpoint: str, protocol: str = "grpc") -> None:
    """OTLP export to `endpoint` over `protocol`, every 50 ms (not every 5 s); the shard
    processes inherit the gateway's environment."""
    for name in OTEL_VARIABLES:
        env.delenv(name, raising=False)
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


@dataclass
class Observed:
    server: RunningServer
    spans: SpanStore
    metrics_url: str

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def settled(self, timeout: float = 30) -> dict[tuple[str, frozenset], float]:
        """A scrape once no step has run for a while: a step still in flight for an earlier
        test's cancelled request must not count in this test's deltas."""
        deadline = time.monotonic() + timeout
        previous = self.scrape()
        while True:
            time.sleep(0.3)
            current = self.scrape()
            if {k: v for k, v in current.items() if k[0].startswith("shardgate_step_")} == {
                k: v for k, v in previous.items() if k[0].startswith("shardgate_step_")
            } or time.monotonic() > deadline:
                return current
            previous = current

    def json_lines(self) -> list[dict]:
        """The server's log lines that are JSON objects (the gateway's and the shards')."""
        return [json.loads(line) for line in self.server.log().splitlines() if line.startswith("{")]

    def log_lines(self, request_id: str, timeout: float = 10) -> list[dict]:
        """The request log lines of a request, once there is one (the last stream message can
        reach the caller just before the gateway writes the line)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.json_lines() if line["logger"] == "shardgate.requests"]
            mine = [line for line in lines if line["request_id"] == request_id]
            if mine or time.monotonic() > deadline:
                return mine
            time.sleep(0.05)


def value(metrics: dict, name: str, **labels) -> float:
    """A sample's value; every series of ours has the model label."""
    labels = {"model": MODEL, **labels}
    return metrics.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    with otlp_receiver() as (endpoint, spans):
        metrics_port = free_port()
        with pytest.MonkeyPatch.context() as env:
            traced_environment(env, endpoint)
            server = start_server(
                tmp_path_factory.mktemp("logs"),
                "--log-format",
                "json",
                "--tp",
                "2",
                "--kv-cache-memory",
                str(16 << 20),
                "--metrics-port",
                str(metrics_port),
                "--device-cost-per-hour",
                str(PRICE_PER_DEVICE_HOUR),
                "--decode-steps",
                "1",  # a replica call per step, so the tests can count steps exactly
            )
        try:
            yield Observed(server, spans, f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            server.stop()


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


def linked_to(spans: list[ReceivedSpan], target: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if (target.trace_id, target.span_id) in s.links]


def request_span(spans: list[ReceivedSpan], trace_id: str, call_name: str = STREAM) -> ReceivedSpan | None:
    """The request's span (GenAI conventions) under the gRPC server span of its call."""
    calls = [s for s in spans if s.trace_id == trace_id and s.name == call_name]
    requests = [s for call in calls for s in children(spans, call)]
    return requests[0] if requests else None


def steps_complete(spans: list[ReceivedSpan], trace_id: str, num_steps: int, name: str = STREAM) -> bool:
    """The request's server span, its request span and stages, and num_steps step spans linked
    to it, each with its driver span and both ranks' forward spans, have all arrived."""
    request = request_span(spans, trace_id, name)
    if request is None or len(children(spans, request)) < 4:
        return False
    steps = linked_to(spans, request)
    return len(steps) == num_steps and all(
        len(drivers := children(spans, step)) == 1 and len(children(spans, drivers[0])) == 2 for step in steps
    )


def span_tree(spans: list[ReceivedSpan], root: ReceivedSpan) -> tuple:
    """A span's shape, times and values left out: its name, kind, service and attribute names,
    then those of its children and of the spans linked to it, each sorted."""
    return (
        root.name,
        root.kind,
        root.service,
        tuple(sorted(root.attributes)),
        tuple(sorted(span_tree(spans, child) for child in children(spans, root))),
        tuple(sorted(span_tree(spans, linked) for linked in linked_to(spans, root))),
    )


def traced_stream(server: RunningServer, spans: SpanStore, request_id: str) -> tuple[list, list[ReceivedSpan], str, str]:
    """A streamed request of 4 tokens under a caller's span: (its deltas, every span received
    once its trace is complete, trace id, the caller's span id)."""
    trace_id, caller_span_id = secrets.token_hex(16), secrets.token_hex(8)
    with server.client() as client:
        deltas = list(
            client.stream(
                "trace me",
                max_new_tokens=4,
                temperature=0,
                ignore_eos=True,
                request_id=request_id,
                traceparent=f"00-{trace_id}-{caller_span_id}-01",
            )
        )
    return deltas, spans.wait_for(lambda spans: steps_complete(spans, trace_id, num_steps=4)), trace_id, caller_span_id


def test_streamed_request_is_traced_from_the_caller_to_every_rank(observed):
    deltas, spans, trace_id, caller_span_id = traced_stream(observed.server, observed.spans, "traced-stream")
    usage = deltas[-1].usage

    # The call: the gRPC server span joins the caller's trace; the request's span is its child,
    # named and attributed as the GenAI conventions say; the stages are the request's children.
    [call] = [s for s in spans if s.name == STREAM and s.trace_id == trace_id]
    assert call.parent_span_id == caller_span_id and call.kind == SERVER and call.service == "shardgate-gateway"
    [request] = children(spans, call)
    assert request.name == REQUEST and request.kind == INTERNAL and request.within(call)
    stages = {s.name: s for s in children(spans, request)}
    assert sorted(stages) == ["decode", "prefill", "queue", "validate"]
    assert all(s.trace_id == trace_id for s in stages.values())
    assert all(s.within(request) for s in stages.values())
    validate, queue, prefill, decode = (stages[name] for name in ("validate", "queue", "prefill", "decode"))
    assert validate.end_ns <= queue.start_ns <= queue.end_ns <= prefill.start_ns <= prefill.end_ns <= decode.start_ns <= decode.end_ns
    attributes = request.attributes
    assert attributes["gen_ai.operation.name"] == "text_completion" and attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.provider.name"] == "shardgate" and attributes["gen_ai.response.model"] == MODEL
    assert attributes["gen_ai.request.max_tokens"] == 4 and attributes["gen_ai.request.temperature"] == 0.0
    assert attributes["gen_ai.request.top_p"] == 1.0 and attributes["gen_ai.response.id"] == "traced-stream"
    assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens and attributes["gen_ai.usage.output_tokens"] == 4
    assert attributes["gen_ai.response.finish_reasons"] == ["length"] and attributes["shardgate.preemptions"] == 0
    assert attributes["shardgate.latency.time_to_first_token"] == pytest.approx(usage.time_to_first_token_s)
    assert attributes["shardgate.latency.time_in_queue"] == pytest.approx(usage.queue_time_s)
    assert attributes["shardgate.latency.time_per_output_token"] > 0
    assert attributes["shardgate.device_seconds"] == pytest.approx(usage.device_seconds)
    assert "error.type" not in attributes

    # Its steps: one prefill and three decodes, each a client span of the Step RPC linked to the request's span.
    steps = sorted(linked_to(spans, request), key=lambda s: s.start_ns)
    assert [s.attributes["shardgate.step.phase"] for s in steps] == ["prefill", "decode", "decode", "decode"]
    assert [s.attributes["shardgate.step.tokens"] for s in steps] == [usage.prompt_tokens, 1, 1, 1]
    assert all(s.kind == CLIENT and s.attributes["shardgate.step.batch_size"] == 1 and s.service == "shardgate-gateway" for s in steps)
    rpc = {"rpc.system": "grpc", "rpc.service": "shardgate.shard.v1.Shard", "rpc.method": "Step"}
    assert all({name: s.attributes[name] for name in rpc} == rpc for s in steps)
    assert sum(s.attributes["shardgate.step.device_seconds"] for s in steps) == pytest.approx(usage.device_seconds)
    for step in steps:
        # ... under it the driver's span of the Step call, and under that both ranks' forwards.
        [driver] = children(spans, step)
        assert driver.name == DRIVER_STEP and driver.kind == SERVER and driver.service == "shardgate-shard"
        assert driver.trace_id == step.trace_id and driver.within(step) and driver.attributes["rpc.method"] == "Step"
        forwards = sorted(children(spans, driver), key=lambda s: s.attributes["shardgate.shard.rank"])
        places = [
            (f.attributes["shardgate.shard.rank"], f.attributes["shardgate.shard.tp_rank"], f.attributes["shardgate.shard.pp_stage"])
            for f in forwards
        ]
        assert places == [(0, 0, 0), (1, 1, 0)]
        for forward in forwards:
            attributes = forward.attributes
            assert forward.name == "forward" and forward.trace_id == step.trace_id and forward.within(driver)
            assert attributes["shardgate.shard.all_reduce.count"] == 2 * LAYERS + 1  # o_proj and down_proj per layer, the embedding
            assert attributes["shardgate.shard.all_gather.count"] == 1  # the LM head
            assert 0 < attributes["shardgate.shard.all_reduce.seconds"] < (forward.end_ns - forward.start_ns) / 1e9
            assert attributes["shardgate.shard.pp_recv.count"] == attributes["shardgate.shard.pp_send.count"] == 0

    [line] = observed.log_lines("traced-stream")
    assert (line["trace_id"], line["span_id"]) == (trace_id, request.span_id)
    assert line["status"] == "OK" and line["completion_tokens"] == 4 and line["level"] == "INFO"


def test_a_trace_exported_over_otlp_http_has_the_same_tree_as_over_grpc(observed, tmp_path):
    _, over_grpc, grpc_trace, _ = traced_stream(observed.server, observed.spans, "tree-grpc")
    with otlp_http_receiver() as (endpoint, spans):
        with pytest.MonkeyPatch.context() as env:
            traced_environment(env, endpoint, "http/protobuf")
            server = start_server(tmp_path, "--tp", "2", "--kv-cache-memory", str(16 << 20), "--decode-steps", "1")
        try:
            _, over_http, http_trace, _ = traced_stream(server, spans, "tree-http")
        finally:
            server.stop()
    [grpc_call] = [s for s in over_grpc if s.trace_id == grpc_trace and s.name == STREAM]
    [http_call] = [s for s in over_http if s.trace_id == http_trace and s.name == STREAM]
    assert span_tree(over_http, http_call) == span_tree(over_grpc, grpc_call)
    assert {s.service for s in over_http} == {"shardgate-gateway", "shardgate-shard"}


def test_each_request_of_a_bidi_stream_has_its_own_span(observed):
    trace_id = secrets.token_hex(16)
    with observed.server.raw_stub() as stub:
        requests = [bidi_generate(f"bidi-{i}", "two of them", max_new_tokens=2 + i, ignore_eos=True) for i in range(2)]
        list(stub.GenerateBidi(iter(requests), metadata=[("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")], timeout=60))
    bidi = "/shardgate.v1.Inference/GenerateBidi"

    def both_ended(spans):
        calls = [s for s in spans if s.trace_id == trace_id and s.name == bidi]
        return bool(calls) and len(children(spans, calls[0])) == 2

    spans = observed.spans.wait_for(both_ended)
    [call] = [s for s in spans if s.trace_id == trace_id and s.name == bidi]
    requests = sorted(children(spans, call), key=lambda s: s.attributes["gen_ai.response.id"])
    assert [(s.name, s.attributes["gen_ai.response.id"], s.attributes["gen_ai.usage.output_tokens"]) for s in requests] == [
        (REQUEST, "bidi-0", 2),
        (REQUEST, "bidi-1", 3),
    ]


def test_an_embed_call_has_a_span_and_metrics(observed):
    trace_id = secrets.token_hex(16)
    before = observed.scrape()
    with observed.server.raw_stub() as stub:
        stub.Embed(build_embed_request(["one", "two words"]), metadata=[("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")])
    embed = "/shardgate.v1.Inference/Embed"
    spans = observed.spans.wait_for(lambda spans: any(s.trace_id == trace_id and s.name == embed for s in spans))
    [call] = [s for s in spans if s.trace_id == trace_id and s.name == embed]
    [span] = children(spans, call)
    assert span.name == f"embeddings {MODEL}" and span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["gen_ai.usage.input_tokens"] > 0
    after = observed.scrape()
    genai = {**GENAI_LABELS, "gen_ai_operation_name": "embeddings"}
    assert delta(before, after, "gen_ai_server_request_duration_seconds_count", **genai) == 1
    assert delta(before, after, "shardgate_embed_input_tokens_total") == span.attributes["gen_ai.usage.input_tokens"]
    assert delta(before, after, "shardgate_responses_total", gen_ai_operation_name="embeddings", code="OK", protocol="grpc") == 1


def test_gateway_and_shards_log_json_lines_with_trace_ids(observed):
    lines = observed.json_lines()
    loggers = {line["logger"] for line in lines}
    assert {"shardgate.server", "shardgate.shard", "shardgate.requests"} <= loggers  # the shards got --log-format too
    assert all({"time", "level", "logger"} <= set(line) for line in lines)
    requests = [line for line in lines if line["logger"] == "shardgate.requests"]
    assert all(len(line["trace_id"]) == 32 and len(line["span_id"]) == 16 for line in requests)


def test_steps_serving_only_unsampled_requests_get_no_spans(observed):
    unsampled, marker = secrets.token_hex(16), secrets.token_hex(16)
    with observed.server.client() as client:
        client.generate("not sampled", max_new_tokens=3, ignore_eos=True, traceparent=f"00-{unsampled}-{secrets.token_hex(8)}-00")
        client.generate(
            "marker", max_new_tokens=1, ignore_eos=True, request_id="marker-1", traceparent=f"00-{marker}-{secrets.token_hex(8)}-01"
        )
    # Each process exports in order, so once the marker's spans from all three are in, any span
    # of the earlier request would be too.
    spans = observed.spans.wait_for(lambda spans: steps_complete(spans, marker, num_steps=1, name="/shardgate.v1.Inference/Generate"))
    assert not [s for s in spans if s.trace_id == unsampled]
    assert not [s for s in spans if any(trace_id == unsampled for trace_id, _ in s.links)]
    [line] = observed.log_lines("marker-1")
    assert line["trace_id"] == marker


def test_metrics_move_by_the_requests_made(observed):
    before = observed.scrape()
    usages = []
    with observed.server.client() as client:
        for n in (3, 5):  # one at a time: each is one prefill step, then n - 1 decode steps
            usages.append(client.generate(f"metrics {n}", max_new_tokens=n, temperature=0, ignore_eos=True).usage)
        with pytest.raises(grpc.RpcError) as rejected:
            client.generate("too long", max_new_tokens=10**6, request_id="rejected-1")
    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = observed.scrape()

    def moved(name, **labels):
        return delta(before, after, name, **labels)

    prompt = sum(u.prompt_tokens for u in usages)
    responses = {"gen_ai_operation_name": "text_completion", "protocol": "grpc"}
    assert moved("shardgate_responses_total", code="OK", **responses) == 2
    assert moved("shardgate_responses_total", code="INVALID_ARGUMENT", **responses) == 1
    assert moved("shardgate_requests_finished_total", finished_reason="length") == 2
    assert moved("shardgate_prompt_tokens_total") == prompt and moved("shardgate_generation_tokens_total") == 8
    assert moved("shardgate_request_prompt_tokens_sum") == prompt and moved("shardgate_request_generation_tokens_count") == 2
    assert moved("shardgate_inter_token_latency_seconds_count") == 2 + 4  # a gap before every token after the first
    assert moved("shardgate_request_prefill_time_seconds_count") == moved("shardgate_request_decode_time_seconds_count") == 2
    for histogram in (
        "gen_ai_server_request_duration_seconds",
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_server_time_per_output_token_seconds",
    ):
        assert moved(f"{histogram}_count", **GENAI_LABELS) == 2
        assert moved(f"{histogram}_bucket", le="+Inf", **GENAI_LABELS) == 2
    assert moved("gen_ai_server_time_to_first_token_seconds_sum", **GENAI_LABELS) == pytest.approx(
        sum(u.time_to_first_token_s for u in usages)
    )
    assert moved("shardgate_request_queue_time_seconds_count") == 2
    assert moved("shardgate_request_queue_time_seconds_sum") == pytest.approx(sum(u.queue_time_s for u in usages))
    assert moved("shardgate_step_duration_seconds_count", replica=0, phase="prefill") == 2
    assert moved("shardgate_step_duration_seconds_count", replica=0, phase="decode") == 2 + 4
    assert moved("shardgate_step_duration_seconds_count", replica=0, phase="mixed") == 0
    assert moved("shardgate_step_batch_size_count", replica=0) == 8 and moved("shardgate_step_batch_size_sum", replica=0) == 8
    assert moved("shardgate_step_tokens_sum", replica=0) == prompt + 2 + 4
    for rank in (0, 1):
        assert moved("shardgate_rank_forward_seconds_count", replica=0, rank=rank) == 8
        assert moved("shardgate_rank_forward_seconds_sum", replica=0, rank=rank) > 0
        assert moved("shardgate_rank_communication_seconds_count", replica=0, rank=rank, op="all_reduce") == 8
        assert moved("shardgate_rank_communication_seconds_sum", replica=0, rank=rank, op="all_reduce") > 0
        memory = {kind: value(after, "shardgate_rank_memory_bytes", replica=0, rank=rank, kind=kind) for kind in ("weights", "kv_cache")}
        assert memory["weights"] > 0 and 0 < memory["kv_cache"] <= 16 << 20  # --kv-cache-memory is each rank's budget
        peak = (
            "shardgate_rank_memory_bytes",
            frozenset({"model": MODEL, "replica": "0", "rank": str(rank), "kind": "activation_peak"}.items()),
        )
        assert peak in after
        free = value(after, "shardgate_rank_device_memory_free_bytes", replica=0, rank=rank)
        assert 0 < free < value(after, "shardgate_rank_device_memory_total_bytes", replica=0, rank=rank)
    device_seconds = sum(u.device_seconds for u in usages)
    assert moved("shardgate_device_seconds_total", replica=0) == pytest.approx(device_seconds)
    assert moved("shardgate_cost_total", replica=0) == pytest.approx(device_seconds * PRICE_PER_DEVICE_HOUR / 3600)
    assert all(u.cost == pytest.approx(u.device_seconds * PRICE_PER_DEVICE_HOUR / 3600) for u in usages)
    assert value(after, "shardgate_requests_running", replica=0) == value(after, "shardgate_requests_waiting", replica=0) == 0
    assert value(after, "shardgate_kv_cache_usage_ratio", replica=0) == 0
    assert value(after, "shardgate_replica_healthy", replica=0) == 1 and value(after, "shardgate_replica_restarts_total", replica=0) == 0
    assert metrics_of_ours_have_the_model_label(after)
    [line] = observed.log_lines("rejected-1")
    assert line["status"] == "INVALID_ARGUMENT"


def metrics_of_ours_have_the_model_label(metrics: dict) -> bool:
    ours = [dict(labels) for name, labels in metrics if name.startswith(("shardgate_", "gen_ai_"))]
    return bool(ours) and all(labels.get("model") == MODEL for labels in ours)


def test_gauges_show_a_running_request_and_counters_its_cancellation(observed):
    before = observed.scrape()
    with grpc.insecure_channel(observed.server.address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).GenerateStream(
            build_request("long", max_new_tokens=1000, ignore_eos=True, request_id="cancelled-1")
        )
        next(call)  # running now, and far from done
        during = observed.scrape()
        call.cancel()
    assert value(during, "shardgate_requests_running", replica=0) == 1
    assert value(during, "shardgate_requests_waiting", replica=0) == 0
    assert 0 < value(during, "shardgate_kv_cache_usage_ratio", replica=0) < 1
    [line] = observed.log_lines("cancelled-1")
    after = observed.scrape()
    assert line["status"] == "CANCELLED" and line["finish_reason"] == "cancelled"
    responses = {"gen_ai_operation_name": "text_completion", "protocol": "grpc"}
    assert delta(before, after, "shardgate_responses_total", code="CANCELLED", **responses) == 1
    assert delta(before, after, "shardgate_requests_finished_total", finished_reason="cancelled") == 1
    assert delta(before, after, "shardgate_generation_tokens_total") == line["completion_tokens"] >= 1
    assert value(after, "shardgate_requests_running", replica=0) == 0 and value(after, "shardgate_kv_cache_usage_ratio", replica=0) == 0


def test_device_seconds_of_requests_add_up_to_the_replicas_busy_device_time(observed):
    before = observed.settled()

    def generate(i):
        with observed.server.client() as client:
            return client.generate("cost " * (1 + 7 * i), max_new_tokens=4 + 3 * i, ignore_eos=True).usage

    with ThreadPoolExecutor(6) as pool:  # batched together: prefills and decodes share steps
        usages = list(pool.map(generate, range(6)))
    after = observed.scrape()
    busy_seconds = sum(
        delta(before, after, "shardgate_step_duration_seconds_sum", replica=0, phase=phase) for phase in ("prefill", "decode", "mixed")
    )
    busy_device_seconds = busy_seconds * 2  # tp 2: two devices
    charged = sum(u.device_seconds for u in usages)
    assert charged == pytest.approx(busy_device_seconds, rel=0.05)
    # Steps were shared: more sequences than steps.
    assert delta(before, after, "shardgate_step_batch_size_sum", replica=0) > delta(
        before, after, "shardgate_step_batch_size_count", replica=0
    )
    assert len({round(u.device_seconds, 9) for u in usages}) == 6  # each paid its own share
    assert Counter(u.replica for u in usages) == {0: 6}


def test_pipeline_stages_report_their_transfers(tmp_path):
    with otlp_receiver() as (endpoint, spans):
        metrics_port = free_port()
        with pytest.MonkeyPatch.context() as env:
            traced_environment(env, endpoint)
            server = start_server(tmp_path, "--pp", "2", "--kv-cache-memory", str(16 << 20), "--metrics-port", str(metrics_port))
        try:
            observed = Observed(server, spans, f"http://127.0.0.1:{metrics_port}/metrics")
            trace_id = secrets.token_hex(16)
            with server.client() as client:
                client.generate("stages", max_new_tokens=2, ignore_eos=True, traceparent=f"00-{trace_id}-{secrets.token_hex(8)}-01")
            received = spans.wait_for(lambda s: steps_complete(s, trace_id, num_steps=2, name="/shardgate.v1.Inference/Generate"))
            metrics = observed.scrape()
        finally:
            server.stop()
    request = request_span(received, trace_id, "/shardgate.v1.Inference/Generate")
    for step in linked_to(received, request):
        [driver] = children(received, step)
        ranks = sorted(children(received, driver), key=lambda s: s.attributes["shardgate.shard.rank"])
        assert all(rank.within(driver) for rank in ranks)
        first, last = (rank.attributes for rank in ranks)
        assert (first["shardgate.shard.pp_stage"], last["shardgate.shard.pp_stage"]) == (0, 1)
        assert (first["shardgate.shard.pp_send.count"], first["shardgate.shard.pp_recv.count"]) == (1, 0)
        assert (last["shardgate.shard.pp_send.count"], last["shardgate.shard.pp_recv.count"]) == (0, 1)
        assert last["shardgate.shard.pp_recv.seconds"] > 0 and first["shardgate.shard.all_reduce.count"] == 0  # tp 1: no collectives
    assert value(metrics, "shardgate_rank_communication_seconds_count", replica=0, rank=1, op="pp_recv") == 2
    assert value(metrics, "shardgate_rank_communication_seconds_sum", replica=0, rank=1, op="pp_recv") > 0
    assert value(metrics, "shardgate_rank_forward_seconds_count", replica=0, rank=0) == 2
