"""Configuration of the gateway's components, one validated dataclass each.

The CLI builds these from flags; nothing here reads the environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardgate.proto.common import DTYPES, QUANTIZATIONS, TracingConfig


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class SchedulerConfig:
    """How the continuous batcher fills each step."""

    max_batch_tokens: int = 2048
    """Most tokens (prefill chunk tokens + one per decode) computed in one step."""
    max_num_seqs: int = 64
    """Most sequences in one step (running decodes + prefills)."""
    priority_aging_s: float = 1.0
    """A waiting request of priority p queues as if it had arrived p × this many seconds earlier."""
    decode_steps: int = 4
    """Most decode steps the replica runs per round trip when a step holds only decodes and
    nothing waits to be admitted (1 = a round trip per token)."""
    prefix_caching: bool = True
    """Requests whose tokens start like an earlier one's share its cached full KV blocks instead of computing them."""

    def __post_init__(self) -> None:
        _require(self.max_batch_tokens >= 1, "max_batch_tokens must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(self.decode_steps >= 1, "decode_steps must be >= 1")
        _require(self.priority_aging_s > 0 and math.isfinite(self.priority_aging_s), "priority_aging_s must be > 0")


@dataclass(frozen=True)
class AdmissionConfig:
    """Bounds past which a new request is refused at once with RESOURCE_EXHAUSTED."""

    max_queue_requests: int = 1024
    """Most requests waiting to run (new, preempted, and Embed calls in the batcher)."""
    max_queue_tokens: int = 1 << 20
    """Most tokens those waiting requests may still have to compute."""
    max_concurrent_requests: int = 2048
    """Most admitted requests not yet ended (waiting or running)."""

    def __post_init__(self) -> None:
        _require(self.max_queue_requests >= 1, "max_queue_requests must be >= 1")
        _require(self.max_queue_tokens >= 1, "max_queue_tokens must be >= 1")
        _require(self.max_concurrent_requests >= 1, "max_concurrent_requests must be >= 1")


@dataclass(frozen=True)
class EmbedBatcherConfig:
    """The dynamic batcher that groups Embed calls into forward passes (as Triton's does)."""

    max_batch_size: int = 32
    """Most inputs in one embedding batch."""
    max_queue_delay_us: int = 1000
    """A batch smaller than max_batch_size and no preferred size runs once its oldest call waited this long."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Input counts at which a batch runs at once, without waiting for the delay."""
    max_inputs: int = 32
    """Most inputs one Embed call may carry (at most max_batch_size)."""

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
class ReplicaConfig:
    """How a replica's shard processes are started and what they load."""

    model: str = "builtin:tiny"
    """A local Hugging Face folder (config.json, *.safetensors, tokenizer.json) or builtin:tiny."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    quantize: str = "none"
    """Weight quantization after loading: none, or int8 (weight-only, one scale per output channel)."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory: float = 0.0
    """KV cache size: bytes when > 1, a fraction in (0, 1] of the memory free after the model and its
    largest step; 0 = 1 GiB on CPU, 0.9 on GPU."""
    start_timeout_s: float = 300.0
    """How long the gateway waits for a replica to load its model and answer."""
    tp: int = 1
    """Tensor-parallel size: ranks that split every layer."""
    pp: int = 1
    """Pipeline-parallel size: stages of consecutive layers."""

    def __post_init__(self) -> None:
        _require(self.tp >= 1 and self.pp >= 1, "tp and pp must be >= 1")
        _require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        _require(self.quantize in QUANTIZATIONS, f"quantize must be one of {', '.join(QUANTIZATIONS)}, not {self.quantize!r}")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be auto, cpu or cuda, not {self.device!r}",
        )
        _require(self.block_size >= 1, "block_size must be >= 1")
        _require(self.kv_cache_memory >= 0 and math.isfinite(self.kv_cache_memory), "kv_cache_memory must be >= 0")
        _require(self.start_timeout_s > 0, "start_timeout_s must be > 0")


@dataclass(frozen=True)
class SupervisionConfig:
    """How the gateway notices and replaces a failed replica."""

    step_timeout_s: float = 60.0
    """A step the replica has not answered in this many seconds marks the replica failed."""
    restart_attempts: int = 5
    """Consecutive restarts of a failed replica before the gateway gives up on it."""
    restart_backoff_s: float = 1.0
    """Wait before the first restart; it doubles with each failed attempt, up to 30 s."""

    def __post_init__(self) -> None:
        _require(self.step_timeout_s > 0, "step_timeout_s must be > 0")
        _require(self.restart_attempts >= 0, "restart_attempts must be >= 0")
        _require(self.restart_backoff_s >= 0, "restart_backoff_s must be >= 0")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before restart attempt number `attempt` (1-based)."""
        return min(30.0, self.restart_backoff_s * 2 ** (attempt - 1))


@dataclass(frozen=True)
class SecurityConfig:
    """Who may connect, and how links are encrypted."""

    tls_cert: str | None = None
    """PEM certificate chain of the public port; with tls_key, the port speaks TLS only."""
    tls_key: str | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: str | None = None
    """PEM CA bundle: clients must present a certificate it signed (mutual TLS)."""
    api_key_file: str | None = None
    """File with one API key per line; every method but health then needs `authorization: Bearer <key>`."""
    replica_ca: str | None = None
    """PEM CA that signed remote replicas' driver certificates (mutual TLS to remote replicas)."""
    replica_cert: str | None = None
    """PEM certificate the gateway presents to remote replicas."""
    replica_key: str | None = None
    """PEM private key of replica_cert."""

    def __post_init__(self) -> None:
        _require((self.tls_cert is None) == (self.tls_key is None), "--tls-cert and --tls-key go together")
        _require(self.tls_client_ca is None or self.tls_cert is not None, "--tls-client-ca needs --tls-cert and --tls-key")
        replica = (self.replica_ca, self.replica_cert, self.replica_key)
        _require(all(replica) or not any(replica), "--replica-tls-ca, --replica-tls-cert and --replica-tls-key go together")

    @property
    def replica_tls(self) -> bool:
        return self.replica_ca is not None


TRACE_STEPS = ("sampled", "all", "none")


@dataclass(frozen=True)
class TelemetryConfig:
    """Traces, metrics and cost accounting of the gateway."""

    tracing: TracingConfig = field(default_factory=TracingConfig)
    """Whether and where spans go (the CLI reads it from the OTEL_* environment)."""
    trace_steps: str = "sampled"
    """Which batch steps get spans: sampled (those serving at least one sampled request), all, none."""
    metrics_port: int = 0
    """Port of the Prometheus text endpoint, on the gateway's host address; 0 = no endpoint."""
    device_cost_per_hour: float = 0.0
    """Price of one device for one hour, in any currency; 0 = responses report no cost."""

    def __post_init__(self) -> None:
        _require(self.trace_steps in TRACE_STEPS, f"trace_steps must be one of {', '.join(TRACE_STEPS)}, not {self.trace_steps!r}")
        _require(0 <= self.metrics_port <= 65535, "metrics_port must be in [0, 65535]")
        _require(
            self.device_cost_per_hour >= 0 and math.isfinite(self.device_cost_per_hour), "device_cost_per_hour must be a finite number >= 0"
        )


@dataclass(frozen=True)
class GatewayConfig:
    """The public server."""

    host: str = "127.0.0.1"
    """Address the public gRPC port binds to."""
    port: int = 50051
    """Public gRPC port; 0 picks a free one."""
    max_new_tokens_limit: int = 4096
    """The largest max_new_tokens a request may ask for."""
    max_stop_strings: int = 16
    """Most stop strings per request."""
    max_stop_string_chars: int = 256
    """Longest stop string, in characters."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, seconds in-flight requests get to finish before they end `cancelled`."""
    replicas: int = 1
    """Replicas this gateway starts on this host, each tp × pp shard processes."""
    remote_replicas: tuple[str, ...] = ()
    """Drivers of replicas started elsewhere (torchrun), as host:port."""
    max_message_bytes: int = 4 << 20
    """Largest request message the server receives; a larger one gets RESOURCE_EXHAUSTED."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    """Queue and concurrency bounds."""
    embed: EmbedBatcherConfig = field(default_factory=EmbedBatcherConfig)
    """Dynamic batching of Embed calls."""
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
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
