import logging

import pytest
import torch

from shardgate.shards import cpu_kernels
from shardgate.shards.compiled_step import CompiledDecode, decode_buckets, default_cache_dir
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.layers import pack_linear_weights
from shardgate.shards.quantization import quantize_model
from shardgate.shards.runner import ModelRunner, SeqChunk
from shardgate.shards.sampler import SamplingParams
from shardgate.shards.weights import load_model

CPU = torch.device("cpu")
BLOCK_SIZE = 4
GREEDY = SamplingParams(seed=0, temperature=0.0)
COMPILE_CACHE = default_cache_dir()
"""The checkout's, shared by the compile tests (tests/conftest.py)."""
PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 8, 150, 61, 77, 12, 9], [120], [64, 65, 66]]


def test_buckets_double_up_to_the_most_sequences():
    assert decode_buckets(1) == (1,)
    assert decode_buckets(4) == (1, 2, 4)
    assert decode_buckets(48) == (1, 2, 4, 8, 16, 32, 48)


def make_runner(
    compiled_cache=None,
    buckets: tuple[int, ...] = (1, 2, 4),
    quantize: str = "none",
    dtype: torch.dtype = torch.float32,
    packed: bool = False,
) -> ModelRunner:
    loaded = load_model("builtin:tiny", dtype, CPU)
    quantize_model(loaded.model, quantize)
    if packed:
        assert pack_linear_weights(loaded.model) > 0
    kv_cache = KVCache(loaded.model.kv_layout, 128, BLOCK_SIZE, dtype, CPU, padding_block=True)
    runner = ModelRunner(loaded.model, loaded.config, kv_cache, CPU)
    if compiled_cache is not None:
        compiled = CompiledDecode(runner.model, runner.kv_cache, buckets, compiled_cache)
        assert compiled.warm_up(loaded.config.hidden_size, dtype, first_stage=True)
        runner.compiled = compiled
    return runner


def generate(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Each prompt prefilled in one step, then `steps` decode steps of all of them; sequence i
    holds blocks [8i, 8i + 8). The last three sequences drop out one by one before the end, so
    the decode batch shrinks."""
    outputs = [[] for _ in prompts]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    results = runner.step([SeqChunk(i, p, 0, tables[i], True, GREEDY, 0) for i, p in enumerate(prompts)])
    for result in results:
        outputs[result.seq_id].append(result.token_id)
    for step in range(steps):
        live = [i for i in range(len(prompts)) if step < steps - max(0, i - len(prompts) + 4)]
        chunks = [SeqChunk(i, [outputs[i][-1]], len(prompts[i]) + len(outputs[i]) - 1, tables[i], True, GREEDY, step + 1) for i in live]
        for result in runner.step(chunks):
            outputs[result.seq_id].append(result.token_id)
    return outputs


def test_compiled_decodes_give_the_eager_tokens_without_recompiling():
    eager = generate(make_runner(), PROMPTS, steps=12)
    runner = make_runner(COMPILE_CACHE)
    torch._dynamo.utils.counters.clear()
    assert generate(runner, PROMPTS, steps=12) == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # contexts grew from 2 to 6 blocks
    # 12 steps of 4, then 3, 2 and 1 sequences: 9 steps in bucket 4 (one padded), then buckets 2 and 1.
    assert dict(runner.compiled.hits) == {4: 10, 2: 1, 1: 1}
    assert runner.compiled.rows[4] == 9 * 4 + 3


def test_each_compiled_step_keeps_its_own_graphs_though_its_calls_skip_the_model_guards():
    """Two models of one shape, compiled in one process: the per-call guards do not look at the
    model (skip_instance_guards), so each step compiles its own code's graphs (own_code). Their
    C++ wrappers have one source (stable_wrapper_source), so both run one compiled wrapper, which
    takes each model's weights as inputs."""
    first = make_runner(COMPILE_CACHE, buckets=(4,))
    second = make_runner()
    with torch.no_grad():
        for parameter in second.model.parameters():
            parameter.mul_(-1.5)
    eager = generate(second, PROMPTS, steps=3)
    compiled = CompiledDecode(second.model, second.kv_cache, (4,), COMPILE_CACHE)
    assert compiled.warm_up(second.config.hidden_size, torch.float32, first_stage=True)
    second.compiled = compiled
    assert generate(second, PROMPTS, steps=3) == eager != generate(first, PROMPTS, steps=3)
    assert compiled.hits[4] == 3 and first.compiled.hits[4] == 3


def test_compiled_decodes_through_the_paged_kernel_give_the_eager_tokens(cpu_kernels_loaded, monkeypatch):
    """With the kernel loaded, the graph writes the cache and attends in one C++ call."""
    monkeypatch.setattr(cpu_kernels, "_loaded", False)  # the eager reference gathers its blocks
    eager = generate(make_runner(), PROMPTS, steps=12)
    monkeypatch.setattr(cpu_kernels, "_loaded", True)
    runner = make_runner(COMPILE_CACHE)
    with torch.profiler.profile() as profile:
        assert generate(runner, PROMPTS, steps=12) == eager
    ops = {event.key for event in profile.key_averages()}
    assert "shardgate_kernels::paged_decode_step" in ops and "shardgate::paged_decode_attention" not in ops


@pytest.mark.skipif(not cpu_kernels._has_bf16_dot(), reason="the decode linear needs AVX512-BF16")
def test_bfloat16_decodes_take_the_decode_linear_and_the_packed_linear(cpu_kernels_loaded, monkeypatch):
    """Eager steps give oneDNN's tokens through the GEMV (one or two rows) and the packed GEMM (3 to
    256 rows); the compiled buckets 1 and 2 call the GEMV for every linear and the LM head, bucket 4
    the packed GEMM. (Compiled bfloat16 tokens are not compared with eager ones: the fused kernels
    round fewer intermediates, which flips near-ties of this random model.)"""
    ours = generate(make_runner(dtype=torch.bfloat16, packed=True), PROMPTS, steps=8)
    with monkeypatch.context() as patch:
        patch.setattr(cpu_kernels, "DECODE_LINEAR_MAX_ROWS", 0)
        assert generate(make_runner(dtype=torch.bfloat16), PROMPTS, steps=8) == ours
    runner = make_runner(COMPILE_CACHE, buckets=(1, 2, 4), dtype=torch.bfloat16, packed=True)
    with torch.profiler.profile() as profile:
        generate(runner, PROMPTS, steps=8)
    calls = {event.key: event.count for event in profile.key_averages()}
    linears = 7 * runner.config.num_hidden_layers
    # 8 steps of 4 sequences, then 3, 2 and 1: buckets 4 (one padded), 2 and 1
    assert dict(runner.compiled.hits) == {4: 6, 2: 1, 1: 1}
    assert calls.get("shardgate_kernels::decode_linear", 0) == (linears + 1) * 2, calls
    # and the eager prefill: its 18 prompt tokens through every linear, the LM head over 4 last rows
    assert calls.get("shardgate_kernels::packed_linear", 0) == (linears + 1) * 6 + linears + 1, calls
    assert not any("mkldnn" in name or name == "aten::mm" for name in calls), calls


def test_int8_compiled_decodes_give_the_eager_tokens():
    # 12 sequences in one bucket of 16: past int8's matrix-vector kernel (up to 8 rows), the graph
    # converts the int8 weights itself.
    prompts = [[7 + i, 3 * i + 1, 200 - i] for i in range(12)]
    eager = generate(make_runner(quantize="int8"), prompts, steps=4)
    assert generate(make_runner(COMPILE_CACHE, buckets=(16,), quantize="int8"), prompts, steps=4) == eager


def test_a_missing_compiler_falls_back_to_eager_with_one_line(tmp_path, caplog):
    loaded = load_model("builtin:tiny", torch.float32, CPU)
    kv_cache = KVCache(loaded.model.kv_layout, 8, BLOCK_SIZE, torch.float32, CPU, padding_block=True)
    torch._dynamo.reset()  # nothing compiled before may be reused
    compiled = CompiledDecode(loaded.model, kv_cache, (1, 2), tmp_path / "empty-cache")
    # (config.patch restores the setting; monkeypatch's undo left it deleted for later tests)
    with (
        caplog.at_level(logging.INFO, logger="shardgate.shard"),
        torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}),
    ):
        assert not compiled.warm_up(loaded.config.hidden_size, torch.float32, first_stage=True)
    failures = [r.getMessage() for r in caplog.records if "compile failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].endswith("decode steps run eager"), caplog.text


def test_a_cache_folder_that_cannot_be_made_falls_back_to_eager(tmp_path, caplog):
    loaded = load_model("builtin:tiny", torch.float32, CPU)
    kv_cache = KVCache(loaded.model.kv_layout, 8, BLOCK_SIZE, torch.float32, CPU, padding_block=True)
    (tmp_path / "file").write_text("")
    compiled = CompiledDecode(loaded.model, kv_cache, (1,), tmp_path / "file" / "cache")
    with caplog.at_level(logging.INFO, logger="shardgate.shard"):
        assert not compiled.warm_up(loaded.config.hidden_size, torch.float32, first_stage=True)
    assert "compile failed (FileExistsError" in caplog.text or "compile failed (NotADirectoryError" in caplog.text, caplog.text


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own model's graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
