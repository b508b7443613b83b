"""A shard process: load this rank's part of the model, warm up and profile the largest step,
size the KV cache (shards/memory.py), serve steps.

Started by the gateway (or by torchrun) with torchrun's environment: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT. `python -m shardgate.shards.main --help` lists the flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
import torch.distributed as dist

from shardgate.proto import shard_pb2, shard_pb2_grpc
from shardgate.proto.common import DTYPES, INTERNAL_MESSAGE_BYTES, QUANTIZATIONS, TracingConfig
from shardgate.proto.tls import server_credentials
from shardgate.proto.tracing import init_tracing
from shardgate.shards.executor import StepExecutor
from shardgate.shards.faults import FaultInjector
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.memory import CapacityError, kv_cache_bytes, profile_step
from shardgate.shards.parallel import ParallelConfig, ParallelState, init_parallel
from shardgate.shards.quantization import quantize_model, weight_bytes_per_step
from shardgate.shards.runner import ModelRunner
from shardgate.shards.weights import LoadedModel, load_model
from shardgate.shards.worker import MainThread, ShardService

log = logging.getLogger("shardgate.shard")

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
# Ranks other than the driver wait in a broadcast between steps, however long the server idles;
# a lost driver is caught by the parent watch (or torchrun's agent), not by this timeout.
COLLECTIVE_TIMEOUT_S = 30 * 24 * 3600.0
DEVICE_NAME_BYTES = 32


@dataclass(frozen=True)
class ShardConfig:
    """One shard process's settings (flags and torchrun's environment)."""

    model: str
    """Local Hugging Face folder or builtin:tiny."""
    dtype: str
    """float32, bfloat16 or float16."""
    quantize: str
    """Weight quantization after loading: none, or int8 (weight-only, per output channel; any dtype)."""
    device: str
    """cpu, cuda, cuda:N or auto."""
    block_size: int
    """Tokens per KV block."""
    kv_cache_memory: float
    """Bytes when > 1, a fraction of the memory left after the model and the largest step when in (0, 1], 0 for the device's default."""
    max_batch_tokens: int
    """Most tokens in one step the gateway sends: the warmup step is this large."""
    max_num_seqs: int
    """Most sequences in one step the gateway sends."""
    listen: str
    """gRPC address the driver serves the gateway on (unix:///path or host:port)."""
    tp: int
    """Tensor-parallel size of the replica."""
    pp: int
    """Pipeline-parallel size of the replica."""
    parent_pid: int
    """Exit when this process (the gateway) is gone; 0 disables the watch."""
    tls_cert: str | None
    """PEM certificate of the driver's TCP port; with tls_key and tls_client_ca: mutual TLS."""
    tls_key: str | None
    """PEM private key of tls_cert."""
    tls_client_ca: str | None
    """PEM CA that signed the gateway's client certificate."""
    rank: int
    world_size: int
    local_rank: int
    tracing: TracingConfig
    """Whether and where this rank exports spans (the OTEL_* environment)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}")
        if self.block_size < 1:
            raise ValueError("--block-size must be >= 1")
        if self.kv_cache_memory < 0:
            raise ValueError("--kv-cache-memory must be >= 0")
        if self.max_batch_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("--max-batch-tokens and --max-num-seqs must be >= 1")
        if self.world_size != self.tp * self.pp:
            raise ValueError(f"WORLD_SIZE={self.world_size} but --tp {self.tp} × --pp {self.pp} = {self.tp * self.pp}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK={self.rank} is outside WORLD_SIZE={self.world_size}")
        tls = (self.tls_cert, self.tls_key, self.tls_client_ca)
        if any(tls) and not all(tls):
            raise ValueError("--tls-cert, --tls-key and --tls-client-ca go together (mutual TLS)")


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def watch_parent(parent_pid: int) -> None:
    """Exits this process soon after the gateway that started it is gone, however it died."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        log.warning("gateway (pid %d) is gone; shard exiting", parent_pid)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def parse_args(argv: list[str] | None = None) -> ShardConfig:
    parser = argparse.ArgumentParser(prog="python -m shardgate.shards.main", description=__doc__)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument(
        "--quantize", default="none", choices=QUANTIZATIONS, help="weight quantization (int8: weight-only, per output channel)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", type=float, default=0.0)
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="largest step the gateway sends (the warmup step)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step")
    parser.add_argument("--listen", required=True, help="driver's address for the gateway: unix:///path or host:port")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--tls-cert", help="PEM certificate of a TCP --listen address (mutual TLS with the next two)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA that signed the gateway's client certificate")
    args = parser.parse_args(argv)
    env = os.environ
    return ShardConfig(
        model=args.model,
        dtype=args.dtype,
        quantize=args.quantize,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_batch_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs,
        listen=args.listen,
        tp=args.tp,
        pp=args.pp,
        parent_pid=args.parent_pid,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        tracing=TracingConfig.from_environ(env),
    )


def _listen(server: grpc.Server, config: ShardConfig) -> int:
    """Binds the driver's address: mutual TLS when certificates are given (across hosts)."""
    if not config.tls_cert:
        return server.add_insecure_port(config.listen)
    return server.add_secure_port(config.listen, server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))


def gather_device_names(device: torch.device, parallel: ParallelState) -> list[str]:
    """Every rank's device name, in rank order (fixed-size byte tensors: no pickle)."""
    if parallel.config.world_size == 1:
        return [str(device)]
    name = torch.zeros(DEVICE_NAME_BYTES, dtype=torch.uint8)
    encoded = str(device).encode()[:DEVICE_NAME_BYTES]
    name[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    names = [torch.empty_like(name) for _ in range(parallel.config.world_size)]
    dist.all_gather(names, name, group=parallel.control)
    return [bytes(n.tolist()).rstrip(b"\0").decode() for n in names]


def _replica_reduce(value: int, parallel: ParallelState, op: dist.ReduceOp.RedOpType) -> int:
    """value reduced over the replica's ranks (on the control group)."""
    if parallel.config.world_size == 1:
        return value
    reduced = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(reduced, op=op, group=parallel.control)
    return int(reduced.item())


def replica_sum(value: int, parallel: ParallelState) -> int:
    """value summed over the replica's ranks."""
    return _replica_reduce(value, parallel, dist.ReduceOp.SUM)


def agree_on_blocks(num_blocks: int, parallel: ParallelState) -> int:
    """The replica's block count: the smallest any rank can hold (the gateway hands out one set
    of block ids for all of them)."""
    return _replica_reduce(num_blocks, parallel, dist.ReduceOp.MIN)


@dataclass(frozen=True)
class RankModel:
    """This rank's part of the model, ready to run steps."""

    loaded: LoadedModel
    runner: ModelRunner
    num_blocks: int
    """KV cache blocks, agreed by every rank of the replica."""


def build_rank_model(config: ShardConfig, device: torch.device, parallel: ParallelState) -> RankModel:
    """Loads this rank's part of the model, profiles the largest step and allocates the KV cache
    in what memory is left. Raises CapacityError when the cache gets less than one block."""
    dtype = TORCH_DTYPES[config.dtype]
    loaded = load_model(config.model, dtype, device, parallel)
    quantize_model(loaded.model, config.quantize)
    profile = profile_step(loaded.model, loaded.config, config.max_batch_tokens, config.max_num_seqs, config.block_size, dtype, device)
    budget = kv_cache_bytes(config.kv_cache_memory, profile, device.type, config.max_batch_tokens)
    log.info("largest step needs %d bytes; %d bytes free; KV cache gets %d", profile.step_peak_bytes, profile.free_bytes, budget)
    num_blocks = agree_on_blocks(budget // loaded.model.kv_layout.bytes_per_block(config.block_size, dtype), parallel)
    if num_blocks < 1:
        raise CapacityError(f"--kv-cache-memory gives {budget} bytes, less than one KV block; raise it")
    kv_cache = KVCache(loaded.model.kv_layout, num_blocks, config.block_size, dtype, device)
    return RankModel(loaded, ModelRunner(loaded.model, loaded.config, kv_cache, device), num_blocks)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(argv)
    except ValueError as error:
        print(f"shard: {error}", file=sys.stderr)
        return 2
    if config.parent_pid:
        watch_parent(config.parent_pid)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", config.world_size))))

    try:
        faults = FaultInjector.from_environment(config.rank)
    except ValueError as error:
        print(f"shard: {error}", file=sys.stderr)
        return 2
    device = resolve_device(config.device, config.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel = init_parallel(
        ParallelConfig(config.tp, config.pp),
        config.rank,
        config.world_size,
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout_s=COLLECTIVE_TIMEOUT_S,
    )
    try:
        rank_model = build_rank_model(config, device, parallel)
    except CapacityError as error:
        print(f"shard: {error}", file=sys.stderr)
        return 2
    loaded, num_blocks = rank_model.loaded, rank_model.num_blocks
    weight_bytes = replica_sum(weight_bytes_per_step(loaded.model), parallel)
    kv_bytes_per_token = replica_sum(rank_model.runner.kv_cache.nbytes // (num_blocks * config.block_size), parallel)
    provider = init_tracing(config.tracing, "shardgate-shard")
    tracer = provider.get_tracer("shardgate.shards") if provider is not None else None
    executor = StepExecutor(rank_model.runner, parallel, tracer, faults)
    devices = gather_device_names(device, parallel)
    if not parallel.is_driver:
        log.info("rank %d (tp %d, pp stage %d) following the driver", config.rank, parallel.tp_rank, parallel.pp_stage)
        executor.follow()
        return 0

    description = shard_pb2.DescribeResponse(
        model=loaded.name,
        model_type=loaded.config.model_type,
        vocab_size=loaded.config.vocab_size,
        max_position_embeddings=loaded.config.max_position_embeddings,
        eos_token_ids=loaded.config.eos_token_ids,
        bos_token_id=-1 if loaded.config.bos_token_id is None else loaded.config.bos_token_id,
        tokenizer_json=loaded.tokenizer_json,
        dtype=config.dtype,
        num_kv_blocks=num_blocks,
        block_size=config.block_size,
        devices=devices,
        tp=config.tp,
        pp=config.pp,
        hidden_size=loaded.config.hidden_size,
        quantization=config.quantize,
        weight_bytes_per_step=weight_bytes,
        kv_bytes_per_token=kv_bytes_per_token,
        num_hidden_layers=loaded.config.num_hidden_layers,
        num_key_value_heads=loaded.config.num_key_value_heads,
        head_dim=loaded.config.head_dim,
    )
    options = [("grpc.max_send_message_length", INTERNAL_MESSAGE_BYTES), ("grpc.max_receive_message_length", INTERNAL_MESSAGE_BYTES)]
    # One worker: steps are sequential by design; the gateway never sends two at once.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=options)
    main_thread = MainThread()
    shard_pb2_grpc.add_ShardServicer_to_server(ShardService(executor, description, main_thread), server)
    try:
        bound = _listen(server, config)
    except RuntimeError:
        bound = 0
    if not bound:
        print(f"shard: cannot listen on {config.listen}", file=sys.stderr)
        return 2
    server.start()

    def terminate(*_) -> None:
        server.stop(0)
        main_thread.stop()

    signal.signal(signal.SIGTERM, terminate)
    log.info(
        "driver serving %s on %s (tp %d × pp %d, %d KV blocks of %d tokens)",
        loaded.name,
        config.listen,
        config.tp,
        config.pp,
        num_blocks,
        config.block_size,
    )
    log.info(
        "quantization %s: %d weight bytes read per step, %d KV bytes per token (whole replica)",
        config.quantize,
        weight_bytes,
        kv_bytes_per_token,
    )
    main_thread.serve()
    server.wait_for_termination()
    executor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
