"""Warmup and KV-cache sizing: profile the largest step, then give the KV cache what is left.

At start, after the weights are loaded, the shard runs one forward shaped like the largest step
the gateway may send (--max-batch-tokens tokens: one long prefill chunk, whose attention is the
widest, beside --max-num-seqs - 1 decodes, so that as many rows as possible sample). Its peak
memory above the weights is what every later step may need on top of the KV cache. The KV
cache then gets --kv-cache-memory: bytes when > 1, or a fraction in (0, 1] of the memory still
free after the weights and that peak; when it does not fit, the shard exits with a message
naming the flag to lower.

Peak measurement: on CUDA, the caching allocator's peak (exact). On CPU, the process's peak
resident size (ru_maxrss) minus its resident size before the forward: exact when the forward
sets the process's peak, and an upper bound when loading peaked higher. Free memory: CUDA's
free device memory; on CPU, the kernel's MemAvailable.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch

from shardgate.shards.kv_cache import KVCache
from shardgate.shards.llama import LlamaForCausalLM
from shardgate.shards.model_config import ModelConfig
from shardgate.shards.runner import ModelRunner, SeqChunk
from shardgate.shards.sampler import SamplingParams

CPU_DEFAULT_KV_BYTES = 1 << 30
"""The CPU default KV budget (or half the memory left, if less)."""
GPU_DEFAULT_KV_FRACTION = 0.9
"""The GPU default: this fraction of the device memory left after the model and the profiled step."""
_PROFILE_SAMPLING = SamplingParams(seed=0, temperature=1.0, top_p=0.9, top_k=50)  # the sort path of the sampler


class CapacityError(Exception):
    """The requested budget does not fit; the message names the flag to lower."""


@dataclass(frozen=True)
class MemoryProfile:
    free_bytes: int
    """Memory free after the weights are loaded (the profiled step's temporaries released)."""
    step_peak_bytes: int
    """Peak memory the largest step needs above the weights."""


def free_memory(device: torch.device) -> int:
    return device_memory(device)[0]


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes: CUDA's figures for a GPU; the host's MemAvailable and MemTotal on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    found = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            key, _, rest = line.partition(":")
            if key in ("MemAvailable", "MemTotal"):
                found[key] = int(rest.split()[0]) * 1024
    page = os.sysconf("SC_PAGE_SIZE")
    return (
        found.get("MemAvailable", os.sysconf("SC_AVPHYS_PAGES") * page),
        found.get("MemTotal", os.sysconf("SC_PHYS_PAGES") * page),
    )


class RankMemory:
    """This rank's memory as its timed steps report it (RankTiming's memory fields)."""

    def __init__(self, model: torch.nn.Module, kv_cache_bytes: int, step_peak_bytes: int, device: torch.device) -> None:
        """Made once the KV cache is allocated: what is allocated then is the baseline a step's
        activations come on top of."""
        tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.weights_bytes = sum(t.nbytes for t in tensors.values())
        self.kv_cache_bytes = kv_cache_bytes
        self.activation_peak_bytes = step_peak_bytes
        self.device = device
        self._baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def sample(self) -> tuple[int, int, int]:
        """(activation peak, device free, device total) bytes, now (after a step)."""
        if self.device.type == "cuda":
            seen = torch.cuda.max_memory_allocated(self.device) - self._baseline
            self.activation_peak_bytes = max(self.activation_peak_bytes, seen)
        return (self.activation_peak_bytes, *device_memory(self.device))


def profile_step(
    model: LlamaForCausalLM,
    config: ModelConfig,
    max_batch_tokens: int,
    max_num_seqs: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> MemoryProfile:
    """Runs the largest step once (warming the model up) and measures its peak memory.

    Raises CapacityError naming --max-batch-tokens when the step itself does not fit.
    """
    num_tokens = min(max_batch_tokens, config.max_position_embeddings)
    num_decodes = min(max_num_seqs, num_tokens) - 1
    prefill = num_tokens - num_decodes
    prefill_blocks = -(-prefill // block_size)
    cache = KVCache(model.kv_layout, prefill_blocks + num_decodes, block_size, dtype, device)
    runner = ModelRunner(model, config, cache, device)
    chunks = [SeqChunk(0, [0] * prefill, 0, list(range(prefill_blocks)), True, _PROFILE_SAMPLING, 0)]
    chunks += [SeqChunk(1 + i, [0], 0, [prefill_blocks + i], True, _PROFILE_SAMPLING, 0) for i in range(num_decodes)]
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            runner.step(chunks)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            before = _resident_bytes()
            runner.step(chunks)
            peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "memory" not in str(error):
            raise
        raise CapacityError(
            f"a step of --max-batch-tokens {max_batch_tokens} tokens does not fit in memory ({error}); lower --max-batch-tokens"
        ) from None
    del runner, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return MemoryProfile(free_bytes=free_memory(device), step_peak_bytes=peak)


def kv_cache_bytes(setting: float, profile: MemoryProfile, device_type: str, max_batch_tokens: int) -> int:
    """The KV budget from --kv-cache-memory; raises CapacityError when it does not fit."""
    left = profile.free_bytes - profile.step_peak_bytes
    if left <= 0:
        raise CapacityError(
            f"a step of --max-batch-tokens {max_batch_tokens} tokens needs {profile.step_peak_bytes} bytes, "
            f"more than the {profile.free_bytes} free after loading the model; lower --max-batch-tokens"
        )
    if setting > 1:
        if setting > left:
            raise CapacityError(
                f"--kv-cache-memory asks for {int(setting)} bytes, but only {left} are free after the model and a step of "
                f"--max-batch-tokens {max_batch_tokens} tokens ({profile.step_peak_bytes} bytes); lower --kv-cache-memory "
                "(or --max-batch-tokens)"
            )
        return int(setting)
    if setting > 0:
        return int(left * setting)
    return int(left * GPU_DEFAULT_KV_FRACTION) if device_type == "cuda" else min(CPU_DEFAULT_KV_BYTES, left // 2)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
