"""`shardgate bench --protocol native,openai,kserve`: the three protocols at each level on the same
text prompts, their token counts complete, and each one's ratios to native."""

import json
import subprocess
import sys

import pytest


def test_bench_drives_native_openai_and_kserve_side_by_side():
    command = [sys.executable, "-m", "shardgate.clients.cli", "bench", "--model", "builtin:tiny", "--kv-cache-memory", str(64 << 20)]
    command += ["--no-compile"]
    command += ["--protocol", "native,openai,kserve", "--concurrency", "1,3", "--num-requests", "3,6", "--prompt-len", "6:12"]
    command += ["--output-len", "5:9", "--warmup", "1", "--no-progress", "--json", "-"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "openai ÷ native" in result.stderr and "kserve ÷ native" in result.stderr
    for level in report["levels"]:
        results = level["results"]
        assert set(results) == {"shardgate", "shardgate openai", "shardgate kserve"}
        native = results["shardgate"]
        for name in ("shardgate openai", "shardgate kserve"):
            other = results[name]
            assert native["errors"] == other["errors"] == 0
            # The same prompts and output lengths: every token of every request was counted on each.
            assert native["output_tokens"] == other["output_tokens"] > 0
            assert level["ratios"][name]["output tokens/s"] == pytest.approx(other["output_tokens_per_s"] / native["output_tokens_per_s"])


def test_bench_openai_against_a_running_server_needs_its_http_address():
    command = [sys.executable, "-m", "shardgate.clients.cli", "bench", "--addr", "127.0.0.1:1", "--protocol", "openai"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "needs --http-addr" in result.stderr
