"""Configuration of the gateway's components, one validated dataclass each.

The CLI builds these from flags; nothing here reads the environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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

    def __post_init__(self) -> None:
        _require(self.max_batch_tokens >= 1, "max_batch_tokens must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
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
        _require(1 <= self.max_inputs <= self.max_batch_size, f"embed max_inputs must be in [1, {self.max_batch_size}] (the max batch size)")


@dataclass(frozen=True)
class ReplicaConfig:
    """How a replica's shard processes are started and what they load."""

    model: str = "builtin:tiny"
    """A local Hugging Face folder (config.json, *.safetensors, tokenizer.json) or builtin:tiny."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory: float = 0.0
    """KV cache size: bytes when > 1, a fraction in (0, 1] of the memory free after the model and its largest step; 0 = 1 GiB on CPU, 0.9 on GPU."""
    start_timeout_s: float = 300.0
    """How long the gateway waits for a replica to load its model and answer."""

    def __post_init__(self) -> None:
        _require(self.dtype in ("float32", "bfloat16", "float16"), f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), f"device must be auto, cpu or cuda, not {self.device!r}")
        _require(self.block_size >= 1, "block_size must be >= 1")
        _require(self.kv_cache_memory >= 0 and math.isfinite(self.kv_cache_memory), "kv_cache_memory must be >= 0")
        _require(self.start_timeout_s > 0, "start_timeout_s must be > 0")


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
    grace_s: float = 5.0
    """Seconds in-flight calls get to finish when the server stops."""
    max_message_bytes: int = 4 << 20
    """Largest request message the server receives; a larger one gets RESOURCE_EXHAUSTED."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    """Queue and concurrency bounds."""
    embed: EmbedBatcherConfig = field(default_factory=EmbedBatcherConfig)
    """Dynamic batching of Embed calls."""
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port must be in [0, 65535]")
        _require(self.max_new_tokens_limit >= 1, "max_new_tokens_limit must be >= 1")
        _require(self.max_stop_strings >= 0, "max_stop_strings must be >= 0")
        _require(self.max_stop_string_chars >= 1, "max_stop_string_chars must be >= 1")
        _require(self.grace_s >= 0, "grace_s must be >= 0")
        _require(self.max_message_bytes >= 1024, "max_message_bytes must be >= 1024")
