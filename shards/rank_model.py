"""This rank's part of the model, built for serving: load the weights, quantize, profile the
largest step, and give the KV cache the memory left (shards/memory.py); and the replica's
description of it for the gateway."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shardgate.proto import inference_pb2, shard_pb2
from shardgate.proto.shard_config import BatchLimits, ShardConfig
from shardgate.shards import cpu_kernels
from shardgate.shards.compiled_step import CompiledDecode, decode_buckets, default_cache_dir
from shardgate.shards.dtype_choice import DtypeChoice, choose_dtype
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.layers import pack_linear_weights
from shardgate.shards.memory import CapacityError, kv_cache_bytes, profile_step
from shardgate.shards.parallel import ParallelState, agree_on_blocks, gather_device_names, replica_sum
from shardgate.shards.quantization import quantize_model, weight_bytes_per_step
from shardgate.shards.runner import ModelRunner
from shardgate.shards.weights import LoadedModel, load_model, model_file

log = logging.getLogger("shardgate.shard")


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The device a --device name means for this rank: auto is cuda when available, and cuda
    is this rank's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


@dataclass(frozen=True)
class RankModel:
    """This rank's part of the model, ready to run steps."""

    loaded: LoadedModel
    dtype: DtypeChoice
    """The dtype the weights and activations are in, and why (--dtype auto chooses)."""
    runner: ModelRunner
    num_blocks: int
    """KV cache blocks, agreed by every rank of the replica."""
    step_peak_bytes: int
    """Memory the largest step needed above the weights, as profiled at start."""


def build_rank_model(config: ShardConfig, device: torch.device, parallel: ParallelState, padding_block: bool | None = None) -> RankModel:
    """Loads this rank's part of the model in the dtype --dtype chooses, profiles the largest step
    and allocates the KV cache in what memory is left. Raises CapacityError when the cache gets
    less than one block, FileNotFoundError / ValueError when the model cannot be loaded.
    padding_block: whether the cache gets the compiled step's padding block (default: when
    --compile; the bench's profile compiles the buckets it needs itself)."""
    settings, limits = config.replica, config.limits
    choice = choose_dtype(settings.dtype, model_file(settings.model), device)
    log.info("dtype %s (%s)", choice.name, choice.reason)
    dtype = choice.torch_dtype
    loaded = load_model(settings.model, dtype, device, parallel)
    quantize_model(loaded.model, settings.quantize)
    cache_dir = Path(settings.compile_cache_dir) if settings.compile_cache_dir else default_cache_dir()
    if settings.compile and device.type == "cpu":  # before profiling: the packed weights take memory
        load_cpu_kernels(loaded.model, cache_dir)
    profile = profile_step(loaded.model, loaded.config, limits.max_batch_tokens, limits.max_num_seqs, settings.block_size, dtype, device)
    budget = kv_cache_bytes(settings.kv_cache_memory, profile, device.type, limits.max_batch_tokens)
    log.info("largest step needs %d bytes; %d bytes free; KV cache gets %d", profile.step_peak_bytes, profile.free_bytes, budget)
    padding = bool(settings.compile if padding_block is None else padding_block)  # comes out of the budget too
    num_blocks = agree_on_blocks(budget // loaded.model.kv_layout.bytes_per_block(settings.block_size, dtype) - padding, parallel)
    if num_blocks < 1:
        raise CapacityError(f"--kv-cache-memory gives {budget} bytes, less than {1 + padding} KV blocks; raise it")
    kv_cache = KVCache(loaded.model.kv_layout, num_blocks, settings.block_size, dtype, device, padding_block=padding)
    runner = ModelRunner(loaded.model, loaded.config, kv_cache, device)
    if settings.compile:
        compile_decode_step(runner, cache_dir, limits, parallel, settings.compile_stats_dir)
    return RankModel(loaded, choice, runner, num_blocks, profile.step_peak_bytes)


def load_cpu_kernels(model: nn.Module, cache_dir: Path) -> None:
    """Builds or loads the C++ decode kernels (shards/cpu_kernels.py: paged attention, the
    decode linears) and packs model's linear weights for their GEMM; logs how long it took, or
    (inside load) why decodes do without them."""
    started = time.perf_counter()
    if cpu_kernels.load(cache_dir):
        packed = pack_linear_weights(model)
        log.info(
            "CPU decode kernels ready in %.1f s (%d MB of linear weights packed for their GEMM); cache %s",
            time.perf_counter() - started,
            packed >> 20,
            cache_dir / "kernels",
        )


def compile_decode_step(runner: ModelRunner, cache_dir: Path, limits: BatchLimits, parallel: ParallelState, stats_dir: str = "") -> None:
    """Compiles the runner's decode step for every bucket (shards/compiled_step.py), on CPU; the
    replica uses it only when every rank compiled (their steps must pad alike). The driver
    writes the buckets' hits into stats_dir, if given."""
    if runner.device.type != "cpu":
        log.info("compile: off on %s (the compiled decode step is built for CPU); steps run eager", runner.device.type)
        return
    compiled = CompiledDecode(runner.model, runner.kv_cache, decode_buckets(limits.max_num_seqs), cache_dir)
    ok = compiled.warm_up(runner.config.hidden_size, runner.dtype, parallel.is_first_stage)
    if replica_sum(int(ok), parallel) == parallel.config.world_size:
        runner.compiled = compiled
        if stats_dir and parallel.is_driver:
            Path(stats_dir).mkdir(parents=True, exist_ok=True)
            compiled.stats_file = Path(stats_dir) / f"decode-buckets-{os.getpid()}.json"
    elif ok:
        log.warning("compile failed on another rank of this replica; decode steps run eager")


def describe_replica(
    rank_model: RankModel, config: ShardConfig, device: torch.device, parallel: ParallelState
) -> shard_pb2.DescribeResponse:
    """The replica's description, as the driver's Describe returns it: the model (as clients
    see it, with the sampling defaults its checkpoint states, those out of range left out), its
    chat template and special tokens' text, its KV cache, its ranks' devices, and the
    replica-wide bytes read per step and held per token. Every rank of the replica calls it
    (the replica-wide figures are collectives)."""
    weight_bytes = replica_sum(weight_bytes_per_step(rank_model.loaded.model), parallel)
    block_size = config.replica.block_size
    block_bytes = rank_model.loaded.model.kv_layout.bytes_per_block(block_size, rank_model.dtype.torch_dtype)
    kv_bytes_per_token = replica_sum(block_bytes // block_size, parallel)
    devices = gather_device_names(device, parallel)
    loaded, settings = rank_model.loaded, config.replica
    defaults = loaded.defaults
    model = inference_pb2.ModelInfoResponse(
        model=loaded.name,
        model_type=loaded.config.model_type,
        vocab_size=loaded.config.vocab_size,
        eos_token_ids=loaded.config.eos_token_ids,
        dtype=rank_model.dtype.name,
        dtype_reason=rank_model.dtype.reason,
        tp=settings.tp,
        pp=settings.pp,
        replicas=1,
        kv_capacity_tokens=[rank_model.num_blocks * settings.block_size],
        devices=devices,
        hidden_size=loaded.config.hidden_size,
        quantization=settings.quantize,
        weight_bytes_per_step=weight_bytes,
        kv_bytes_per_token=kv_bytes_per_token,
        num_hidden_layers=loaded.config.num_hidden_layers,
        num_key_value_heads=loaded.config.num_key_value_heads,
        head_dim=loaded.config.head_dim,
        has_chat_template=bool(defaults.chat_template),
    )
    if defaults.temperature is not None and math.isfinite(defaults.temperature) and defaults.temperature >= 0:
        model.default_temperature = defaults.temperature
    if defaults.top_p is not None and 0 < defaults.top_p <= 1:
        model.default_top_p = defaults.top_p
    if defaults.top_k is not None and defaults.top_k >= 0:
        model.default_top_k = defaults.top_k
    return shard_pb2.DescribeResponse(
        model=model,
        max_position_embeddings=loaded.config.max_position_embeddings,
        tokenizer_json=loaded.tokenizer_json,
        num_kv_blocks=rank_model.num_blocks,
        block_size=settings.block_size,
        chat_template=defaults.chat_template or "",
        bos_token=defaults.bos_token or "",
        eos_token=defaults.eos_token or "",
        limits=config.limits.to_message(),
    )
