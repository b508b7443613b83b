"""`shardgate bench --profile`: where a decode step's time goes, by torch.profiler, in this
process: the model the bench serves is built here as a shard builds it (the same flags, so
compiled or not), and steps of `batch` decodes at the workload's mean context run under the
profiler. Each operator's own CPU time goes to a share: linears (matmuls, prepacked or int8),
attention (the KV cache's writes and gathers, scaled-dot-product attention), sampling (timed
apart, on logits of the step's shape) and the rest (norms, RoPE, activations, residuals, the
step's Python and the packing of its inputs). With a compiled step, inductor's fused C++ kernels
are profiled too (cpp.enable_kernel_profile) and counted by the operations their names carry; the
profiled graph calls them from Python, not from the C++ wrapper a served graph has (whose calls
torch.profiler does not see), so its step is somewhat slower than the served one."""

from __future__ import annotations

import time
from argparse import Namespace
from dataclasses import dataclass

from shardgate.clients.tools import linear_bounds
from shardgate.clients.tools.linear_bounds import LinearBounds

LINEAR_NAMES = ("linear", "aten::mm", "aten::addmm", "int8pack_mm", "mkl")
ATTENTION_NAMES = ("scaled_dot_product", "flash_attention", "index_select", "index_copy", "index_put", "paged_decode")
PROFILED_STEPS = 10


@dataclass(frozen=True)
class StepProfile:
    """One decode step's time and its shares (fractions of it)."""

    label: str
    batch: int
    context: int
    step_s: float
    linears: float
    attention: float
    sampling: float

    @property
    def rest(self) -> float:
        return max(0.0, 1 - self.linears - self.attention - self.sampling)

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "batch": self.batch,
            "context": self.context,
            "step_ms": self.step_s * 1e3,
            "shares": {"linears": self.linears, "attention": self.attention, "sampling": self.sampling, "rest": self.rest},
        }

    def line(self) -> str:
        return (
            f"  {self.label}, batch {self.batch}, context {self.context}: step {self.step_s * 1e3:.1f} ms = linears {self.linears:.0%}, "
            f"attention {self.attention:.0%}, sampling {self.sampling:.0%}, rest {self.rest:.0%}"
        )


def profile_steps(args: Namespace, batches: list[int], context: int, bounds: bool = False) -> tuple[list[StepProfile], LinearBounds | None]:
    """Builds the model the serve flags in args describe (in this process, one rank; compiled
    for the profiled batch sizes' buckets only) and profiles decode steps of each batch size (at
    most --max-num-seqs) at the given context length; with bounds, also times the model's
    linears alone (linear_bounds.py)."""
    from dataclasses import replace
    from pathlib import Path

    import torch
    import torch._inductor.config

    from shardgate.server.cli import config_from_args
    from shardgate.server.replicas.launcher import shard_config
    from shardgate.shards.compiled_step import CompiledDecode, decode_buckets, default_cache_dir
    from shardgate.shards.parallel import ParallelConfig, ParallelState
    from shardgate.shards.rank_model import build_rank_model, load_cpu_kernels, resolve_device

    if args.tp != 1 or args.pp != 1:
        raise ValueError("--profile runs one rank in this process: drop --tp and --pp")
    torch._inductor.config.cpp.enable_kernel_profile = True  # the fused kernels show in the profile
    gateway = config_from_args(args)
    config = shard_config(replace(gateway.replica, compile=False), gateway.scheduler, listen="profile")
    device = resolve_device(config.replica.device, 0)
    rank_model = build_rank_model(config, device, ParallelState(ParallelConfig()), padding_block=gateway.replica.compile)
    runner = rank_model.runner
    batches = [min(batch, gateway.scheduler.max_num_seqs) for batch in batches]
    if gateway.replica.compile:
        buckets = decode_buckets(gateway.scheduler.max_num_seqs)
        needed = tuple(sorted({next(bucket for bucket in buckets if bucket >= batch) for batch in batches}))
        cache_dir = Path(gateway.replica.compile_cache_dir) if gateway.replica.compile_cache_dir else default_cache_dir()
        if device.type == "cpu":
            load_cpu_kernels(runner.model, cache_dir)
        compiled = CompiledDecode(runner.model, runner.kv_cache, needed, cache_dir, cpp_wrapper=False)  # the profiler sees its ops
        if compiled.warm_up(runner.config.hidden_size, runner.dtype, first_stage=True):
            runner.compiled = compiled
    capacity = runner.kv_cache.num_blocks * runner.kv_cache.block_size
    label = "eager" if runner.compiled is None else "compiled"
    profiles = [_profile(runner, batch, min(context, capacity // batch - 1), label) for batch in batches]
    return profiles, linear_bounds.measure(runner.model, sorted({1, *batches})) if bounds else None


def _profile(runner, batch: int, context: int, label: str) -> StepProfile:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from shardgate.shards.runner import SeqChunk
    from shardgate.shards.sampler import SamplingParams, sample

    greedy = SamplingParams(seed=0, temperature=0.0)
    blocks = -(-(context + 1) // runner.kv_cache.block_size)
    chunks = [SeqChunk(i, [1], context, list(range(i * blocks, (i + 1) * blocks)), True, greedy, 0) for i in range(batch)]
    for _ in range(3):
        runner.step(chunks)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            runner.step(chunks)
        step_s = (time.perf_counter() - started) / PROFILED_STEPS
    own = {event.key: event.self_cpu_time_total / 1e6 / PROFILED_STEPS for event in profiler.key_averages()}
    linears = sum(seconds for name, seconds in own.items() if any(part in name for part in LINEAR_NAMES))
    attention = sum(seconds for name, seconds in own.items() if any(part in name for part in ATTENTION_NAMES))
    logits = torch.zeros(batch, runner.config.vocab_size)
    started = time.perf_counter()
    for _ in range(PROFILED_STEPS):
        sample(logits, [greedy] * batch, [0] * batch)
    sampling = (time.perf_counter() - started) / PROFILED_STEPS
    return StepProfile(label, batch, context, step_s, linears / step_s, attention / step_s, sampling / step_s)
