"""Warmup profiling and KV sizing: what --kv-cache-memory gives, and the flag named when it does not fit."""

import pytest
import torch

from shardgate.shards import memory
from shardgate.shards.builtin import builtin_config
from shardgate.shards.memory import CapacityError, MemoryProfile, kv_cache_bytes, profile_step
from shardgate.shards.weights import load_model

GiB = 1 << 30
PROFILE = MemoryProfile(free_bytes=10 * GiB, step_peak_bytes=2 * GiB)


@pytest.mark.parametrize(
    "setting, device, expected",
    [
        (3 * GiB, "cpu", 3 * GiB),  # bytes
        (0.5, "cuda", 4 * GiB),  # a fraction of what the model and the largest step leave
        (1.0, "cuda", 8 * GiB),
        (0, "cuda", int(8 * GiB * 0.9)),  # GPU default
        (0, "cpu", GiB),  # CPU default: 1 GiB, or half of what is left if less
    ],
)
def test_kv_budget_from_the_flag(setting, device, expected):
    assert kv_cache_bytes(setting, PROFILE, device, 2048) == expected
    assert kv_cache_bytes(0, MemoryProfile(free_bytes=GiB, step_peak_bytes=0), "cpu", 2048) == GiB // 2


def test_a_budget_that_does_not_fit_names_the_flag():
    with pytest.raises(CapacityError, match="--kv-cache-memory asks for 9663676416 bytes.*lower --kv-cache-memory"):
        kv_cache_bytes(9 * GiB, PROFILE, "cpu", 2048)
    with pytest.raises(CapacityError, match="--max-batch-tokens 4096 tokens needs .*lower --max-batch-tokens"):
        kv_cache_bytes(0.5, MemoryProfile(free_bytes=GiB, step_peak_bytes=2 * GiB), "cuda", 4096)


def test_profile_runs_the_largest_step_and_measures_it():
    loaded = load_model("builtin:tiny", torch.float32, "cpu")
    profile = profile_step(loaded.model, loaded.config, 256, 8, 16, torch.float32, torch.device("cpu"))
    assert profile.free_bytes > 0 and profile.step_peak_bytes >= 0


def test_a_step_that_does_not_fit_names_max_batch_tokens(monkeypatch):
    def out_of_memory(self, chunks):
        assert sum(len(c.token_ids) for c in chunks) == 512 and len(chunks) == 8  # one prefill beside seven decodes
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(memory.ModelRunner, "step", out_of_memory)
    loaded = load_model("builtin:tiny", torch.float32, "cpu")
    with pytest.raises(CapacityError, match="--max-batch-tokens 512 tokens does not fit.*lower --max-batch-tokens"):
        profile_step(loaded.model, builtin_config(), 512, 8, 16, torch.float32, torch.device("cpu"))
