"""The gateway's Prometheus metrics, in a registry of their own, served as text on --metrics-port.

Every series of ours carries a `model` label (the served model), so one dashboard serves many
deployments. Names follow Prometheus conventions (base units in the name, `_total` on counters)
and, for the request latencies, the OpenTelemetry GenAI semantic conventions: their names
(gen_ai.server.request.duration → gen_ai_server_request_duration_seconds), attributes and
advised bucket boundaries. The README maps each series to its vLLM and TGI counterpart.

Request metrics are recorded when a request ends; step and per-rank metrics when a step
returns; the replicas' queue, KV-cache and health state is read when the endpoint is scraped,
so it costs the engine nothing. The registry also holds prometheus_client's process and
platform collectors (process_*, python_info).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shardgate.proto import shard_pb2
from shardgate.server.measures import GENAI_EMBEDDINGS, ReplicaStatus, RequestTimes, StepShape
from shardgate.server.request import Request

# OpenTelemetry GenAI semantic conventions, advised bucket boundaries (seconds).
REQUEST_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# Steps and their parts: from a fraction of a millisecond (a small decode) to seconds.
STEP_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# Tokens per request (the GenAI conventions' advice for gen_ai.client.token.usage).
REQUEST_TOKENS_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
COMMUNICATION = ("all_reduce", "all_gather", "pp_send", "pp_recv")
GENAI_LABELS = ("model", "gen_ai_operation_name", "gen_ai_request_model", "protocol")
RANK_MEMORY = ("weights", "kv_cache", "activation_peak")


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.model = ""
        """The served model: the `model` label of every series (set once the replicas describe it)."""

        def histogram(name: str, help: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
            return Histogram(name, help, ["model", *labels], buckets=buckets, registry=registry)

        def counter(name: str, help: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, help, ["model", *labels], registry=registry)

        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Requests (generations and Embed calls) from arrival to their last token (or end).",
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
        self.inter_token_latency = histogram(
            "shardgate_inter_token_latency_seconds",
            "Time between a request's consecutive tokens reaching the gateway (one observation per token after the first).",
            (),
            INTER_TOKEN_BUCKETS,
        )
        self.queue_time = histogram(
            "shardgate_request_queue_time_seconds", "Arrival until a request's first step.", (), REQUEST_DURATION_BUCKETS
        )
        self.prefill_time = histogram(
            "shardgate_request_prefill_time_seconds", "A request's first step until its first token.", (), REQUEST_DURATION_BUCKETS
        )
        self.decode_time = histogram(
            "shardgate_request_decode_time_seconds", "A request's first token until its end.", (), REQUEST_DURATION_BUCKETS
        )
        self.request_prompt_tokens = histogram(
            "shardgate_request_prompt_tokens", "Prompt tokens per ended generation request.", (), REQUEST_TOKENS_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "shardgate_request_generation_tokens", "Generated tokens per ended generation request.", (), REQUEST_TOKENS_BUCKETS
        )
        self.prompt_tokens = counter("shardgate_prompt_tokens", "Prompt tokens of ended generation requests.")
        self.generation_tokens = counter("shardgate_generation_tokens", "Tokens generated for ended requests.")
        self.embed_input_tokens = counter("shardgate_embed_input_tokens", "Input tokens of Embed calls that succeeded.")
        self.finished = counter(
            "shardgate_requests_finished", "Generation requests that reached a replica, by finish reason.", ("finished_reason",)
        )
        self.responses = counter(
            "shardgate_responses",
            "Requests by operation, final status as a gRPC code (validation failures included) and frontend protocol.",
            ("gen_ai_operation_name", "code", "protocol"),
        )
        self.step_duration = histogram(
            "shardgate_step_duration_seconds",
            "Wall time of batch steps, seen from the gateway.",
            ("replica", "phase"),
            STEP_SECONDS_BUCKETS,
        )
        self.step_batch_size = histogram("shardgate_step_batch_size", "Sequences in a batch step.", ("replica",), BATCH_SIZE_BUCKETS)
        self.step_tokens = histogram("shardgate_step_tokens", "Tokens computed in a batch step.", ("replica",), STEP_TOKENS_BUCKETS)
        self.rank_forward = histogram(
            "shardgate_rank_forward_seconds",
            "A shard rank's part of a step (its layers, transfers, sampling).",
            ("replica", "rank"),
            STEP_SECONDS_BUCKETS,
        )
        self.rank_communication = histogram(
            "shardgate_rank_communication_seconds",
            "A shard rank's time in one kind of communication during a step.",
            ("replica", "rank", "op"),
            STEP_SECONDS_BUCKETS,
        )
        self.rank_memory = Gauge(
            "shardgate_rank_memory_bytes",
            "A shard rank's memory by use: weights, kv_cache, activation_peak (the most a step needed above those two).",
            ["model", "replica", "rank", "kind"],
            registry=registry,
        )
        self.device_memory_free = Gauge(
            "shardgate_rank_device_memory_free_bytes",
            "Free memory of a shard rank's device after its last step (CUDA's figure; on CPU the host's MemAvailable).",
            ["model", "replica", "rank"],
            registry=registry,
        )
        self.device_memory_total = Gauge(
            "shardgate_rank_device_memory_total_bytes",
            "Total memory of a shard rank's device (on CPU the host's MemTotal).",
            ["model", "replica", "rank"],
            registry=registry,
        )
        self.device_seconds = counter(
            "shardgate_device_seconds", "Device time of batch steps: wall time × the replica's devices.", ("replica",)
        )
        self.cost = counter("shardgate_cost", "Device time priced at --device-cost-per-hour (its currency).", ("replica",))
        self.resumed = counter(
            "shardgate_resumed_generations",
            "Generations that moved to another replica (or their own, restarted) after theirs failed (cause failure) or its "
            "driver got SIGTERM (cause preemption), and continued there.",
            ("cause",),
        )
        self.resume_recompute_tokens = histogram(
            "shardgate_resume_recompute_tokens",
            "Tokens a resumed generation has computed again (prompt + tokens generated before the move; the prefix cache may "
            "serve part of them).",
            (),
            REQUEST_TOKENS_BUCKETS,
        )

    def request_finished(self, request: Request, times: RequestTimes) -> None:
        model = self.model
        genai = (model, request.operation, model, request.protocol)
        self.request_duration.labels(*genai).observe(times.duration_s)
        if times.ttft_s is not None:
            self.time_to_first_token.labels(*genai).observe(times.ttft_s)
        if times.tpot_s is not None:
            self.time_per_output_token.labels(*genai).observe(times.tpot_s)
        if times.queue_s is not None:
            self.queue_time.labels(model).observe(times.queue_s)
        if times.prefill_s is not None:
            self.prefill_time.labels(model).observe(times.prefill_s)
        if times.decode_s is not None:
            self.decode_time.labels(model).observe(times.decode_s)
        inter_token = self.inter_token_latency.labels(model)
        for gap in request.token_gaps:
            inter_token.observe(gap)
        self.request_prompt_tokens.labels(model).observe(len(request.prompt_ids))
        self.request_generation_tokens.labels(model).observe(len(request.output_ids))
        self.prompt_tokens.labels(model).inc(len(request.prompt_ids))
        self.generation_tokens.labels(model).inc(len(request.output_ids))
        if request.finish_reason is not None:
            self.finished.labels(model, request.finish_reason.value).inc()

    def request_resumed(self, cause: str, recompute_tokens: int) -> None:
        self.resumed.labels(self.model, cause).inc()
        self.resume_recompute_tokens.labels(self.model).observe(recompute_tokens)

    def embed_finished(self, protocol: str, input_tokens: int, duration_s: float, ok: bool) -> None:
        self.request_duration.labels(self.model, GENAI_EMBEDDINGS, self.model, protocol).observe(duration_s)
        if ok:
            self.embed_input_tokens.labels(self.model).inc(input_tokens)

    def response(self, operation: str, code: grpc.StatusCode, protocol: str) -> None:
        self.responses.labels(self.model, operation, code.name, protocol).inc()

    def step_finished(
        self, replica: int, shape: StepShape, wall_s: float, device_seconds: float, cost: float, ranks: Sequence[shard_pb2.RankTiming]
    ) -> None:
        model, label = self.model, str(replica)
        self.step_duration.labels(model, label, shape.phase).observe(wall_s)
        self.step_batch_size.labels(model, label).observe(shape.batch_size)
        self.step_tokens.labels(model, label).observe(shape.tokens)
        self.device_seconds.labels(model, label).inc(device_seconds)
        self.cost.labels(model, label).inc(cost)
        for timing in ranks:
            rank = str(timing.rank)
            self.rank_forward.labels(model, label, rank).observe(timing.forward_s)
            for op in COMMUNICATION:
                self.rank_communication.labels(model, label, rank, op).observe(getattr(timing, f"{op}_s"))
            for kind in RANK_MEMORY:
                self.rank_memory.labels(model, label, rank, kind).set(getattr(timing, f"{kind}_bytes"))
            self.device_memory_free.labels(model, label, rank).set(timing.device_memory_free_bytes)
            self.device_memory_total.labels(model, label, rank).set(timing.device_memory_total_bytes)

    def watch(self, replicas: Callable[[], Sequence[ReplicaStatus]]) -> None:
        """Exposes each replica's state (index = replica); `replicas` gives it at each scrape."""
        self.registry.register(_ReplicaState(lambda: self.model, replicas))

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serves /metrics in a daemon thread until `shutdown()`."""
        try:
            server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as error:
            raise RuntimeError(f"cannot serve metrics on {host}:{port}: {error.strerror}") from None
        return server


class _ReplicaState:
    """Requests running and waiting, KV-cache use, preemptions, prefix-cache lookups, health and
    restarts of each replica, read at scrape time (plain reads of sizes and counters; the engine
    is not stopped)."""

    def __init__(self, model: Callable[[], str], replicas: Callable[[], Sequence[ReplicaStatus]]) -> None:
        self.model = model
        self.replicas = replicas

    def collect(self):
        labels = ["model", "replica"]
        running = GaugeMetricFamily("shardgate_requests_running", "Requests in the running batch.", labels=labels)
        waiting = GaugeMetricFamily("shardgate_requests_waiting", "Requests queued (new or preempted).", labels=labels)
        kv_usage = GaugeMetricFamily("shardgate_kv_cache_usage_ratio", "Fraction of the KV-cache blocks in use (0-1).", labels=labels)
        preemptions = CounterMetricFamily("shardgate_preemptions", "Running requests preempted to free KV blocks.", labels=labels)
        prefix_queries = CounterMetricFamily(
            "shardgate_prefix_cache_query_tokens", "Tokens of started requests looked up in the prefix cache.", labels=labels
        )
        prefix_hits = CounterMetricFamily(
            "shardgate_prefix_cache_hit_tokens", "Tokens of started requests whose KV came from the prefix cache.", labels=labels
        )
        healthy = GaugeMetricFamily("shardgate_replica_healthy", "1 while the replica serves, 0 while it is down.", labels=labels)
        restarts = CounterMetricFamily("shardgate_replica_restarts", "Restarts of a failed replica.", labels=labels)
        model = self.model()
        for index, replica in enumerate(self.replicas()):
            label = [model, str(index)]
            status = replica.state
            running.add_metric(label, status.running)
            waiting.add_metric(label, status.waiting)
            kv_usage.add_metric(label, status.kv_usage)
            preemptions.add_metric(label, status.preemptions)
            prefix_queries.add_metric(label, status.prefix_query_tokens)
            prefix_hits.add_metric(label, status.prefix_hit_tokens)
            healthy.add_metric(label, int(replica.healthy))
            restarts.add_metric(label, replica.restarts)
        yield from (running, waiting, kv_usage, preemptions, prefix_queries, prefix_hits, healthy, restarts)
