"""The gateway's Prometheus metrics, in a registry of their own, served as text on --metrics-port.

The request latency histograms follow the OpenTelemetry GenAI semantic conventions: their
names (gen_ai.server.request.duration → gen_ai_server_request_duration_seconds) and their
advised bucket boundaries. Request metrics are recorded when a request ends; step metrics when
a step returns; the replicas' queue and KV-cache state is read from the schedulers when the
endpoint is scraped, so it costs the engine nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shardgate.proto import shard_pb2
from shardgate.server.measures import GENAI_OPERATION, RequestTimes, StepShape
from shardgate.server.request import Request
from shardgate.server.scheduler import Scheduler

# OpenTelemetry GenAI semantic conventions, advised bucket boundaries (seconds).
REQUEST_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# Steps and their parts: from a fraction of a millisecond (a small decode) to seconds.
STEP_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
COMMUNICATION = ("all_reduce", "all_gather", "pp_send", "pp_recv")
GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_request_model", "protocol")


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Generation requests from arrival to their last token (or end).",
            GENAI_LABELS,
            buckets=REQUEST_DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Arrival until the first generated token.",
            GENAI_LABELS,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request.",
            GENAI_LABELS,
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "shardgate_request_queue_time_seconds",
            "Arrival until a request's first step.",
            buckets=REQUEST_DURATION_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter("shardgate_prompt_tokens", "Prompt tokens of ended requests.", registry=registry)
        self.generation_tokens = Counter("shardgate_generation_tokens", "Tokens generated for ended requests.", registry=registry)
        self.finished = Counter(
            "shardgate_requests_finished", "Generation requests that reached a replica, by finish reason.", ["reason"], registry=registry
        )
        self.responses = Counter(
            "shardgate_responses",
            "Generation requests by final status as a gRPC code (validation failures included) and frontend protocol.",
            ["code", "protocol"],
            registry=registry,
        )
        self.step_duration = Histogram(
            "shardgate_step_duration_seconds",
            "Wall time of batch steps, seen from the gateway.",
            ["replica", "phase"],
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.step_batch_size = Histogram(
            "shardgate_step_batch_size", "Sequences in a batch step.", ["replica"], buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.step_tokens = Histogram(
            "shardgate_step_tokens", "Tokens computed in a batch step.", ["replica"], buckets=STEP_TOKENS_BUCKETS, registry=registry
        )
        self.rank_forward = Histogram(
            "shardgate_rank_forward_seconds",
            "A shard rank's part of a step (its layers, transfers, sampling).",
            ["replica", "rank"],
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.rank_communication = Histogram(
            "shardgate_rank_communication_seconds",
            "A shard rank's time in one kind of communication during a step.",
            ["replica", "rank", "op"],
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.device_seconds = Counter(
            "shardgate_device_seconds", "Device time of batch steps: wall time × the replica's devices.", ["replica"], registry=registry
        )
        self.cost = Counter(
            "shardgate_cost", "Device time priced at --device-cost-per-hour (its currency).", ["replica"], registry=registry
        )

    def request_finished(self, model: str, request: Request, times: RequestTimes) -> None:
        genai = (GENAI_OPERATION, model, request.protocol)
        self.request_duration.labels(*genai).observe(times.duration_s)
        if times.ttft_s is not None:
            self.time_to_first_token.labels(*genai).observe(times.ttft_s)
        if times.tpot_s is not None:
            self.time_per_output_token.labels(*genai).observe(times.tpot_s)
        if times.queue_s is not None:
            self.queue_time.observe(times.queue_s)
        self.prompt_tokens.inc(len(request.prompt_ids))
        self.generation_tokens.inc(len(request.output_ids))
        if request.finish_reason is not None:
            self.finished.labels(request.finish_reason.value).inc()

    def response(self, code: grpc.StatusCode, protocol: str) -> None:
        self.responses.labels(code.name, protocol).inc()

    def step_finished(
        self, replica: int, shape: StepShape, wall_s: float, device_seconds: float, cost: float, ranks: Sequence[shard_pb2.RankTiming]
    ) -> None:
        label = str(replica)
        self.step_duration.labels(label, shape.phase).observe(wall_s)
        self.step_batch_size.labels(label).observe(shape.batch_size)
        self.step_tokens.labels(label).observe(shape.tokens)
        self.device_seconds.labels(label).inc(device_seconds)
        self.cost.labels(label).inc(cost)
        for timing in ranks:
            rank = str(timing.rank)
            self.rank_forward.labels(label, rank).observe(timing.forward_s)
            for op in COMMUNICATION:
                self.rank_communication.labels(label, rank, op).observe(getattr(timing, f"{op}_s"))

    def watch(self, schedulers: Callable[[], Sequence[Scheduler]]) -> None:
        """Exposes each replica's scheduler state (index = replica); `schedulers` gives the
        current ones at each scrape (a restarted replica gets a new scheduler)."""
        self.registry.register(_ReplicaState(schedulers))

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serves /metrics in a daemon thread until `shutdown()`."""
        try:
            server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as error:
            raise RuntimeError(f"cannot serve metrics on {host}:{port}: {error.strerror}") from None
        return server


class _ReplicaState:
    """Requests running and waiting, KV-cache use, preemptions and prefix-cache lookups of each replica, read from
    the schedulers at scrape time (plain reads of sizes and counters; the engine is not
    stopped)."""

    def __init__(self, schedulers: Callable[[], Sequence[Scheduler]]) -> None:
        self.schedulers = schedulers

    def collect(self):
        running = GaugeMetricFamily("shardgate_requests_running", "Requests in the running batch.", labels=["replica"])
        waiting = GaugeMetricFamily("shardgate_requests_waiting", "Requests queued (new or preempted).", labels=["replica"])
        kv_usage = GaugeMetricFamily("shardgate_kv_cache_usage_ratio", "Fraction of the KV-cache blocks in use (0-1).", labels=["replica"])
        preemptions = CounterMetricFamily("shardgate_preemptions", "Running requests preempted to free KV blocks.", labels=["replica"])
        prefix_queries = CounterMetricFamily(
            "shardgate_prefix_cache_queries", "Tokens of started requests looked up in the prefix cache.", labels=["replica"]
        )
        prefix_hits = CounterMetricFamily(
            "shardgate_prefix_cache_hits", "Tokens of started requests whose KV came from the prefix cache.", labels=["replica"]
        )
        for index, scheduler in enumerate(self.schedulers()):
            label = [str(index)]
            status = scheduler.status()
            running.add_metric(label, status.running)
            waiting.add_metric(label, status.waiting)
            kv_usage.add_metric(label, status.kv_usage)
            preemptions.add_metric(label, status.preemptions)
            prefix_queries.add_metric(label, status.prefix_query_tokens)
            prefix_hits.add_metric(label, status.prefix_hit_tokens)
        yield from (running, waiting, kv_usage, preemptions, prefix_queries, prefix_hits)
