"""`shardgate bench` end to end at a small size: the HF baseline on a (small) benchmark model,
and open-loop load against a running server."""

import json
import subprocess
import sys

import pytest

from shardgate.clients.bench_model import BenchModelShape, make_bench_model
from shardgate.clients.workload import Lengths, WorkloadConfig, make_workload

SMALL = BenchModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def shardgate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardgate.clients.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    """The benchmark model's recipe at a small size (the full one is `shardgate bench --make-model`)."""
    return make_bench_model(tmp_path_factory.mktemp("bench-model"), SMALL)


def test_bench_with_the_hf_baseline_prints_both_sides_and_ratios(bench_model, tmp_path):
    result = shardgate(
        "bench", "--model", str(bench_model), "--kv-cache-memory", str(64 << 20), "--num-requests", "6", "--prompt-len", "8",
        "--output-len", "12", "--concurrency", "3", "--baseline", "hf", "--device-cost-per-hour", "2", "--json", str(tmp_path / "b.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bench-model") and "6 requests, prompt 8 tokens, output 12 tokens, closed loop, concurrency 3" in lines[0]
    assert lines[1].split()[:1] == ["metric"]
    for column in ("shardgate", "hf one-at-a-time", "hf static batch 3", "shardgate ÷ one-at-a-time", "shardgate ÷ static batch 3"):
        assert column in lines[1]
    throughput = next(line for line in lines if line.startswith("output tokens/s")).split()
    assert len(throughput) == 2 + 3 + 2 and throughput[-1].endswith("x") and throughput[-2].endswith("x")
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report["levels"][0]["results"]) == {"shardgate", "hf one-at-a-time", "hf static batch 3"}
    for summary in report["levels"][0]["results"].values():  # the same workload on both sides
        assert (summary["requests"], summary["errors"], summary["output_tokens"]) == (6, 0, 72)
        assert summary["cost_per_million_tokens"] > 0 and summary["ttft_ms"]["p99"] > 0
    ours, theirs = report["levels"][0]["results"]["shardgate"], report["levels"][0]["results"]["hf one-at-a-time"]
    assert report["levels"][0]["ratios"]["hf one-at-a-time"]["output tokens/s"] == pytest.approx(ours["output_tokens_per_s"] / theirs["output_tokens_per_s"])


def test_bench_open_loop_against_a_running_server(tiny_server):
    result = shardgate("bench", "--addr", tiny_server.address, "--rate", "25", "--num-requests", "10", "--prompt-len", "4:12", "--output-len", "3:9", "--seed", "5", "--json", "-")
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


def test_bench_refuses_a_baseline_without_a_checkpoint_folder():
    result = shardgate("bench", "--model", "builtin:tiny", "--baseline", "hf", timeout=60)
    assert result.returncode == 2 and "--baseline hf needs --model to be a local Hugging Face folder" in result.stderr
