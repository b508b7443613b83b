"""Configuration of the gateway's components, one validated dataclass each.

Each `shardgate serve` flag is declared here once, on the field it sets, with its default and
help (shardgate.proto.flags); the dataclass's __post_init__ checks it. The settings a shard
process shares (ReplicaSettings, BatchLimits) are declared in shardgate.proto.shard_config and
extended here. Nothing here reads the environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardgate.proto.common import LOG_FORMATS, TracingConfig
from shardgate.proto.flags import flag, int_list
from shardgate.proto.shard_config import BatchLimits, ReplicaSettings


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class SchedulerConfig(BatchLimits):
    """How the continuous batcher fills each step (within the BatchLimits it extends)."""

    priority_aging_s: float = flag(
        1.0,
        "a waiting request gains one priority level per this many seconds (default %(default)s): a waiting request of "
        "priority p queues as if it had arrived p × this many seconds earlier",
    )
    prefix_caching: bool = flag(True, "share the KV blocks of prompt prefixes already computed (default on)")
    async_scheduling: bool = flag(
        True,
        "plan and send each step while the one before it runs, so the replica never waits for the gateway between steps "
        "and each step's tokens stream as soon as it ends; a request that ends computes one token more, dropped (default on)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.priority_aging_s > 0 and math.isfinite(self.priority_aging_s), "priority_aging_s must be > 0")


@dataclass(frozen=True)
class AdmissionConfig:
    """Bounds past which a new request is refused at once with RESOURCE_EXHAUSTED."""

    max_queue_requests: int = flag(
        1024,
        "most requests waiting to run (new, preempted, and Embed calls in the batcher); more get RESOURCE_EXHAUSTED (default %(default)s)",
    )
    max_queue_tokens: int = flag(
        1 << 20, "most tokens those waiting requests may still have to compute; more get RESOURCE_EXHAUSTED (default %(default)s)"
    )
    max_concurrent_requests: int = flag(
        2048,
        "most admitted requests not yet ended (waiting, running, or with output not yet written to the client); "
        "more get RESOURCE_EXHAUSTED (default %(default)s)",
    )
    max_concurrent_requests_per_key: int = flag(
        0,
        "with --api-key-file: most admitted requests not yet ended per API key; more get RESOURCE_EXHAUSTED naming this "
        "quota (default %(default)s = no quota)",
    )

    def __post_init__(self) -> None:
        _require(self.max_queue_requests >= 1, "max_queue_requests must be >= 1")
        _require(self.max_queue_tokens >= 1, "max_queue_tokens must be >= 1")
        _require(self.max_concurrent_requests >= 1, "max_concurrent_requests must be >= 1")
        _require(self.max_concurrent_requests_per_key >= 0, "max_concurrent_requests_per_key must be >= 0")


@dataclass(frozen=True)
class StreamConfig:
    """Backpressure: how much output may wait for a slow reader, and for how long."""

    max_undelivered_tokens: int = flag(
        256,
        "most generated tokens (and error messages) of one stream made but not yet written to the client; past it the "
        "stream's requests get no decode steps and a multiplexed stream reads no new request (default %(default)s)",
    )
    stall_timeout_s: float = flag(
        60.0,
        "a request held back this long because its client does not read ends DEADLINE_EXCEEDED and frees its KV blocks "
        "(default %(default)s s)",
        name="--stream-stall-timeout",
    )
    max_concurrent_streams: int = flag(
        100, "most concurrent calls (HTTP/2 streams) per client connection (grpc.max_concurrent_streams; default %(default)s)"
    )

    def __post_init__(self) -> None:
        _require(self.max_undelivered_tokens >= 1, "max_undelivered_tokens must be >= 1")
        _require(self.stall_timeout_s > 0 and math.isfinite(self.stall_timeout_s), "stream stall_timeout_s must be > 0")
        _require(self.max_concurrent_streams >= 1, "max_concurrent_streams must be >= 1")


@dataclass(frozen=True)
class TokenizerPoolConfig:
    """The threads that tokenize inputs and render chat templates, off the event loop (the
    tokenizer releases the GIL while it encodes, so streams keep flowing meanwhile)."""

    threads: int = flag(2, "threads that tokenize inputs and render chat templates (default %(default)s)", name="--tokenizer-threads")
    max_pending: int = flag(
        256,
        "most calls whose inputs wait for or are in the tokenizer threads; more get RESOURCE_EXHAUSTED (default %(default)s)",
        name="--max-tokenizing-requests",
    )

    def __post_init__(self) -> None:
        _require(self.threads >= 1, "tokenizer threads must be >= 1")
        _require(self.max_pending >= 1, "max_tokenizing_requests must be >= 1")


@dataclass(frozen=True)
class EmbedBatcherConfig:
    """The dynamic batcher that groups Embed calls into forward passes (as Triton's does)."""

    max_batch_size: int = flag(32, "most inputs in one embedding batch (default %(default)s)", name="--embed-max-batch-size")
    max_queue_delay_us: int = flag(
        1000,
        "a batch smaller than the max batch size and no preferred size runs once its oldest call waited this long (default %(default)s)",
        name="--embed-max-queue-delay-us",
    )
    preferred_batch_sizes: tuple[int, ...] = flag(
        (),
        "comma-separated input counts at which an embedding batch runs at once, without waiting for the delay (default: none)",
        name="--embed-preferred-batch-sizes",
        type=int_list,
    )
    max_inputs: int = flag(
        32, "most inputs per Embed call, at most --embed-max-batch-size (default %(default)s)", name="--embed-max-inputs"
    )

    def __post_init__(self) -> None:
        _require(self.max_batch_size >= 1, "embed max_batch_size must be >= 1")
        _require(self.max_queue_delay_us >= 0, "embed max_queue_delay_us must be >= 0")
        _require(
            all(1 <= size <= self.max_batch_size for size in self.preferred_batch_sizes),
            f"embed preferred batch sizes must be in [1, {self.max_batch_size}] (the max batch size)",
        )
        _require(
            1 <= self.max_inputs <= self.max_batch_size, f"embed max_inputs must be in [1, {self.max_batch_size}] (the max batch size)"
        )


@dataclass(frozen=True)
class ReplicaConfig(ReplicaSettings):
    """How a replica's shard processes are started (and the ReplicaSettings they load with)."""

    start_timeout_s: float = flag(
        900.0,
        "seconds the gateway waits for a replica to load its model, compile its decode step (--compile) and answer (default %(default)s)",
        name="--replica-start-timeout",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.start_timeout_s > 0, "start_timeout_s must be > 0")


@dataclass(frozen=True)
class SupervisionConfig:
    """How the gateway notices and replaces a failed replica, and what becomes of its requests."""

    step_timeout_s: float = flag(
        60.0,
        "the longest a replica's call (a step, an embedding batch; a decode run: per step) may go unanswered before the replica "
        "counts as failed, and the deadline of a call of a shape not seen yet (default %(default)s s); see --step-timeout-multiple",
        name="--step-timeout",
    )
    step_timeout_multiple: float = flag(
        10.0,
        "a call's deadline is this many times the moving average of calls of its shape (kind, tokens per forward), per "
        "forward it runs, between --step-timeout-floor and --step-timeout (default %(default)s)",
    )
    step_timeout_floor_s: float = flag(
        8.0,
        "the shortest deadline of a replica's call, and of its heartbeat: room for a host's hiccups (default %(default)s s)",
        name="--step-timeout-floor",
    )
    heartbeat_interval_s: float = flag(
        2.0,
        "an idle replica's driver is asked to check that all its ranks answer after this many seconds without a call "
        "(default %(default)s; 0: never)",
        name="--heartbeat-interval",
    )
    max_request_retries: int = flag(
        1,
        "times a generation running on a replica that fails moves to another and continues there; at the next such failure "
        "it ends UNAVAILABLE (default %(default)s). Moves off a replica whose driver got SIGTERM do not count",
    )
    resume_on_restart: bool = flag(
        False,
        "when a replica fails and no other can serve, its generations wait (within their deadlines) for a replica to come "
        "back from its restart and continue there, instead of ending UNAVAILABLE (default off: the wait can be long)",
    )
    restart_attempts: int = flag(5, "consecutive restarts of a failed replica before giving up (default %(default)s)")
    restart_backoff_s: float = flag(
        1.0, "seconds before the first restart, doubling per attempt up to 30 (default %(default)s)", name="--restart-backoff"
    )

    def __post_init__(self) -> None:
        _require(self.step_timeout_s > 0, "step_timeout_s must be > 0")
        _require(self.step_timeout_multiple >= 1 and math.isfinite(self.step_timeout_multiple), "step_timeout_multiple must be >= 1")
        _require(self.step_timeout_floor_s > 0 and math.isfinite(self.step_timeout_floor_s), "step_timeout_floor_s must be > 0")
        _require(self.heartbeat_interval_s >= 0 and math.isfinite(self.heartbeat_interval_s), "heartbeat_interval_s must be >= 0")
        _require(self.max_request_retries >= 0, "max_request_retries must be >= 0")
        _require(self.restart_attempts >= 0, "restart_attempts must be >= 0")
        _require(self.restart_backoff_s >= 0, "restart_backoff_s must be >= 0")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before restart attempt number `attempt` (1-based)."""
        return min(30.0, self.restart_backoff_s * 2 ** (attempt - 1))


PREFIX_CACHE_SHARING = ("per-key", "global")


@dataclass(frozen=True)
class SecurityConfig:
    """Who may connect, and how links are encrypted."""

    tls_cert: str | None = flag(None, "PEM certificate (chain) of the public port (with --tls-key: TLS only)")
    tls_key: str | None = flag(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = flag(None, "PEM CA bundle; clients must present a certificate it signed (mutual TLS)")
    api_key_file: str | None = flag(
        None, "file of API keys, one per line; every method but health then needs `authorization: Bearer <key>`"
    )
    replica_ca: str | None = flag(
        None, "PEM CA of remote replicas' driver certificates (mutual TLS to --remote-replica)", name="--replica-tls-ca"
    )
    replica_cert: str | None = flag(None, "PEM certificate the gateway presents to remote replicas", name="--replica-tls-cert")
    replica_key: str | None = flag(None, "PEM private key of --replica-tls-cert", name="--replica-tls-key")
    prefix_cache_sharing: str = flag(
        "per-key",
        "with --api-key-file, whose requests share cached prompt prefixes: per-key (default: only requests of the same "
        "API key) or global (all)",
        choices=PREFIX_CACHE_SHARING,
    )
    replica_token_file: str | None = flag(
        None, "file holding the shared token of remote replicas' drivers (their --listen-token-file), sent on every call to them"
    )

    def __post_init__(self) -> None:
        _require(
            self.prefix_cache_sharing in PREFIX_CACHE_SHARING,
            f"prefix_cache_sharing must be one of {', '.join(PREFIX_CACHE_SHARING)}, not {self.prefix_cache_sharing!r}",
        )
        _require((self.tls_cert is None) == (self.tls_key is None), "--tls-cert and --tls-key go together")
        _require(self.tls_client_ca is None or self.tls_cert is not None, "--tls-client-ca needs --tls-cert and --tls-key")
        replica = (self.replica_ca, self.replica_cert, self.replica_key)
        _require(all(replica) or not any(replica), "--replica-tls-ca, --replica-tls-cert and --replica-tls-key go together")

    @property
    def replica_tls(self) -> bool:
        return self.replica_ca is not None


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP frontend (server/openai/): same host, engine, keys and TLS as gRPC."""

    port: int | None = flag(
        None,
        "serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...) on this port of --host "
        "(default: off; 0 = any free)",
        name="--http-port",
        type=int,
    )
    max_choices: int = flag(16, "most choices one OpenAI request may ask for (n × prompts; default %(default)s)", name="--http-max-choices")

    def __post_init__(self) -> None:
        _require(self.port is None or 0 <= self.port <= 65535, "http port must be in [0, 65535]")
        _require(self.max_choices >= 1, "http max_choices must be >= 1")


TRACE_STEPS = ("sampled", "all", "none")


@dataclass(frozen=True)
class TelemetryConfig:
    """Traces, metrics and cost accounting of the gateway."""

    tracing: TracingConfig = field(default_factory=TracingConfig)
    """Whether and where spans go (the CLI reads it from the OTEL_* environment)."""
    trace_steps: str = flag(
        "sampled",
        "which batch steps get spans when tracing (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT) is on: "
        "sampled (those serving a sampled request; default), all, none",
        choices=TRACE_STEPS,
    )
    metrics_port: int = flag(0, "serve Prometheus metrics on this port of --host (default: no metrics endpoint)")
    device_cost_per_hour: float = flag(0.0, "price of one device-hour, in any currency; responses then report usage.cost (default: none)")
    log_format: str = flag(
        "text", "log lines of the gateway and its shards: text (default) or json (one object per line, with trace and span ids)"
    )

    def __post_init__(self) -> None:
        _require(self.log_format in LOG_FORMATS, f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        _require(self.trace_steps in TRACE_STEPS, f"trace_steps must be one of {', '.join(TRACE_STEPS)}, not {self.trace_steps!r}")
        _require(0 <= self.metrics_port <= 65535, "metrics_port must be in [0, 65535]")
        _require(
            self.device_cost_per_hour >= 0 and math.isfinite(self.device_cost_per_hour), "device_cost_per_hour must be a finite number >= 0"
        )


@dataclass(frozen=True)
class GatewayConfig:
    """The public server (fields in the order `shardgate serve --help` lists their flags)."""

    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    host: str = flag("127.0.0.1", "address the public gRPC port binds to (default %(default)s)")
    port: int = flag(50051, "public gRPC port (default %(default)s; 0 = any free)")
    replicas: int = flag(1, "replicas to start on this host, each tp × pp shard processes (default %(default)s)")
    remote_replicas: tuple[str, ...] = flag(
        (),
        "driver address of a replica started with torchrun (repeatable)",
        name="--remote-replica",
        action="append",
        metavar="HOST:PORT",
    )
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_new_tokens_limit: int = flag(4096, "largest max_new_tokens a request may ask for (default %(default)s)")
    max_stop_strings: int = 16
    """Most stop strings per request."""
    max_stop_string_chars: int = 256
    """Longest stop string, in characters."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    streams: StreamConfig = field(default_factory=StreamConfig)
    tokenizer: TokenizerPoolConfig = field(default_factory=TokenizerPoolConfig)
    embed: EmbedBatcherConfig = field(default_factory=EmbedBatcherConfig)
    max_message_bytes: int = flag(4 << 20, "largest request message; larger ones get RESOURCE_EXHAUSTED (default %(default)s)")
    drain_timeout_s: float = flag(
        30.0,
        "on SIGTERM, seconds in-flight requests get to finish before they end `cancelled` (default %(default)s; 0: end them at once)",
        name="--drain-timeout",
    )
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port must be in [0, 65535]")
        _require(self.max_new_tokens_limit >= 1, "max_new_tokens_limit must be >= 1")
        _require(self.max_stop_strings >= 0, "max_stop_strings must be >= 0")
        _require(self.max_stop_string_chars >= 1, "max_stop_string_chars must be >= 1")
        _require(self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0")
        _require(self.replicas >= 0, "replicas must be >= 0")
        _require(self.replicas + len(self.remote_replicas) >= 1, "at least one replica (local or remote) is needed")
        _require(self.max_message_bytes >= 1024, "max_message_bytes must be >= 1024")
