"""`shardgate bench` end to end at a small size: the HF baseline on a (small) benchmark model and
on a tiny GGUF file, and open-loop load against a running server."""

import json
import subprocess
import sys

import pytest
from tiny_gguf import write_gguf

from shardgate.clients.tools.bench_model import BenchModelShape, make_bench_model
from shardgate.clients.tools.workload import Lengths, WorkloadConfig, make_workload

SMALL = BenchModelShape(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
)


def shardgate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardgate.clients.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    """The benchmark model's recipe at a small size (the full one is `shardgate bench --make-model`)."""
    return make_bench_model(tmp_path_factory.mktemp("bench-model"), SMALL)


def test_bench_with_the_hf_baseline_and_the_in_process_engine_at_two_levels(bench_model, tmp_path):
    result = shardgate(
        "bench",
        "--model",
        str(bench_model),
        "--no-compile",
        "--kv-cache-memory",
        str(64 << 20),
        "--num-requests",
        "2,6",
        "--prompt-len",
        "8",
        "--output-len",
        "12",
        "--concurrency",
        "1,3",
        "--baseline",
        "hf",
        "--in-process",
        "--device-cost-per-hour",
        "2",
        "--json",
        str(tmp_path / "b.json"),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    titles = [i for i, line in enumerate(lines) if line.startswith("bench-model")]
    assert len(titles) == 2 and "2 requests, prompt 8 tokens, output 12 tokens, closed loop, concurrency 1" in lines[titles[0]]
    assert "6 requests, prompt 8 tokens, output 12 tokens, closed loop, concurrency 3" in lines[titles[1]]
    header = lines[titles[1] + 1]
    for column in (
        "shardgate",
        "in-process engine",
        "hf one-at-a-time",
        "hf static batch 3",
        "shardgate ÷ in-process engine",
        "shardgate ÷ static batch 3",
    ):
        assert column in header
    throughput = next(line for line in lines[titles[1] :] if line.startswith("output tokens/s")).split()
    assert len(throughput) == 2 + 4 + 3 and all(cell.endswith("x") for cell in throughput[-3:])
    assert lines[-2].startswith("bandwidth bound: ") and "× the bound" in lines[-2]
    assert lines[-1].startswith("KV cache: ") and "(1.000×)" in lines[-1]  # allocated = 2 × layers × kv heads × head dim × 4 bytes

    report = json.loads((tmp_path / "b.json").read_text())
    single, batched = report["levels"]
    assert set(single["results"]) == {"shardgate", "in-process engine", "hf one-at-a-time"}
    assert set(batched["results"]) == {"shardgate", "in-process engine", "hf static batch 3", "hf one-at-a-time"}
    for name in ("shardgate", "in-process engine"):  # the same workload on every side
        assert (single["results"][name]["requests"], single["results"][name]["output_tokens"]) == (2, 24)
    for name in ("shardgate", "in-process engine", "hf static batch 3"):
        summary = batched["results"][name]
        assert (summary["requests"], summary["errors"], summary["output_tokens"]) == (6, 0, 72)
        assert summary["cost_per_million_tokens"] > 0 and summary["ttft_ms"]["p99"] > 0 and summary["tpot_ms"]["p50"] > 0
    assert batched["results"]["hf one-at-a-time"] == single["results"]["hf one-at-a-time"]  # run once, on the concurrency-1 workload
    ours, theirs = batched["results"]["shardgate"], batched["results"]["hf static batch 3"]
    assert batched["ratios"]["hf static batch 3"]["output tokens/s"] == pytest.approx(
        ours["output_tokens_per_s"] / theirs["output_tokens_per_s"]
    )
    hardware = report["hardware"]
    assert hardware["decode_step_ms"] == pytest.approx(single["results"]["shardgate"]["tpot_ms"]["p50"])
    assert hardware["weight_bytes_per_step"] > 0 and hardware["bandwidth_bytes_per_s"] > 1e8 and hardware["kv_over_theory"] == 1.0


def test_bench_open_loop_against_a_running_server(tiny_server):
    result = shardgate(
        "bench",
        "--addr",
        tiny_server.address,
        "--rate",
        "25",
        "--num-requests",
        "10",
        "--prompt-len",
        "4:12",
        "--output-len",
        "3:9",
        "--seed",
        "5",
        "--json",
        "-",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "open loop, Poisson 25 req/s" in result.stderr.splitlines()[0]
    assert report["levels"][0]["load"]["rate"] == 25 and report["levels"][0]["workload"]["prompt_len"] == "4:12"
    with tiny_server.client() as client:
        info = client.model_info()
    items = make_workload(WorkloadConfig(10, Lengths(4, 12), Lengths(3, 9), 5), info.vocab_size, frozenset(info.eos_token_ids))
    summary = report["levels"][0]["results"]["shardgate"]
    assert summary["errors"] == 0 and summary["output_tokens"] == sum(item.max_new_tokens for item in items)
    assert summary["cost_per_million_tokens"] is None  # no price given


def test_bench_with_the_hf_baseline_on_a_gguf_file_in_bfloat16(tmp_path):
    gguf_file = write_gguf(tmp_path / "tiny.Q4_1.gguf", "Q4_1", tied=True)  # quantized and tied, as builtin:smollm2
    result = shardgate(
        "bench",
        "--model",
        str(gguf_file),
        "--dtype",
        "bfloat16",
        "--no-compile",
        "--kv-cache-memory",
        str(16 << 20),
        "--num-requests",
        "4",
        "--prompt-len",
        "6",
        "--output-len",
        "5",
        "--concurrency",
        "2",
        "--baseline",
        "hf",
        "--no-progress",
        "--json",
        "-",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dtype"] == "bfloat16"  # the server's, which the baseline loads the GGUF in
    results = report["levels"][0]["results"]
    assert set(results) == {"shardgate", "hf one-at-a-time", "hf static batch 2"}
    for summary in results.values():  # the same four requests on every side
        assert (summary["requests"], summary["errors"], summary["output_tokens"]) == (4, 0, 20)


def test_bench_refuses_a_baseline_on_a_model_transformers_cannot_load():
    result = shardgate("bench", "--model", "builtin:tiny", "--baseline", "hf", timeout=60)
    assert result.returncode == 2
    assert "--baseline hf needs --model to be a local Hugging Face folder, a .gguf file or builtin:smollm2" in result.stderr
    assert "not 'builtin:tiny'" in result.stderr
