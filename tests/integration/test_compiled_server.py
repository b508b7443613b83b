"""A server with its decode step compiled (--compile): the warm-up's log lines, the compile cache
reused by a restart, the eager fallback when compiling fails, and the eager server's greedy tokens.

Each compiled start costs tens of seconds on a small machine, so the module starts four: a cold
start and a restart on one fresh cache folder, one whose C++ compiler is missing, and the
bench's (compiled, then eager)."""

import json
import re
import subprocess
import sys

import pytest
from servers import start_server

COMPILED = ("--compile", "--max-num-seqs", "2", "--kv-cache-memory", str(64 << 20))
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


def shared_objects(cache_dir) -> set[str]:
    """The shared objects inductor (the kernels and the graphs' C++ wrappers, `*.main.so`) and
    the paged kernel's build keep in a cache folder."""
    return {path.name for path in cache_dir.rglob("*.so")}


def greedy(server) -> list[list[int]]:
    with server.client() as client:
        return [client.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids for prompt in PROMPTS]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh compile cache folder for this module's servers."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, cache_dir):
    """A compiled server started twice on cache_dir: (the first start's log, the shared objects it
    cached, the second server, still running, and the shared objects cached after it)."""
    first = start_server(tmp_path_factory.mktemp("logs"), *COMPILED, "--compile-cache-dir", str(cache_dir), timeout=600)
    first.stop()
    cached = shared_objects(cache_dir)
    second = start_server(tmp_path_factory.mktemp("logs"), *COMPILED, "--compile-cache-dir", str(cache_dir), timeout=600)
    yield first.log(), cached, second, shared_objects(cache_dir)
    second.stop()


def test_warm_up_logs_each_bucket_and_the_total_before_serving(restarted):
    log, _, second, _ = restarted
    for text in (log, second.log()):
        assert re.search(r"compiled decode bucket 1 in [\d.]+ s\n", text) and re.search(r"compiled decode bucket 2 in [\d.]+ s\n", text)
        assert re.search(r"compiled 2 decode buckets \(1,2\) in [\d.]+ s; cache ", text), text
        assert "compile failed" not in text


def test_a_restart_reuses_the_compiled_kernels_and_wrappers(restarted):
    _, cached, _, after = restarted
    assert cached and after == cached  # the second start built no new shared object
    assert any(name.startswith("shardgate_cpu_kernels_") for name in cached)


def test_compiled_greedy_tokens_equal_the_eager_server(restarted, tiny_server):
    _, _, second, _ = restarted
    assert greedy(second) == greedy(tiny_server)


def test_without_a_compiler_the_server_runs_eager_after_one_line(tmp_path, tiny_server):
    missing = str(tmp_path / "no-such-g++")
    server = start_server(
        tmp_path, *COMPILED, "--compile-cache-dir", str(tmp_path / "empty-cache"), env={"CXX": missing, "CC": missing}, timeout=600
    )
    try:
        assert greedy(server) == greedy(tiny_server)
        failures = [line for line in server.log().splitlines() if "compile failed" in line]
        assert len(failures) == 1 and failures[0].endswith("decode steps run eager"), server.log()
    finally:
        server.stop()


def test_bench_compares_compiled_and_eager_with_the_bucket_hits_and_a_profile(tmp_path, cache_dir):
    # on the cache the restarted servers filled (the same graphs), when the module runs whole
    command = [sys.executable, "-m", "shardgate.clients.cli", "bench", "--model", "builtin:tiny", *COMPILED]
    command += ["--compile-cache-dir", str(cache_dir), "--compare-compile", "--profile", "--concurrency", "1,2"]
    command += ["--num-requests", "2,4", "--prompt-len", "6", "--output-len", "8", "--warmup", "0", "--no-progress"]
    command += ["--json", str(tmp_path / "b.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("metric"))
    assert "eager (--no-compile)" in header and "shardgate ÷ eager (--no-compile)" in header
    report = json.loads((tmp_path / "b.json").read_text())
    for level, batch in zip(report["levels"], (1, 2)):
        assert set(level["results"]) == {"shardgate", "eager (--no-compile)"}
        assert level["results"]["eager (--no-compile)"]["output_tokens"] == level["results"]["shardgate"]["output_tokens"]
        buckets = level["decode_buckets"]["buckets"]
        decodes = sum(b["sequences"] for b in buckets.values())
        if batch == 1:  # each request's 7 decode steps ran compiled
            assert buckets == {"1": {"steps": 14, "sequences": 14}}
        else:  # a decode in a step beside another request's prefill ran eager
            assert set(buckets) <= {"1", "2"} and 0 < decodes <= 28
    assert "padding waste: " in result.stdout
    bounds = report["linear_bounds"]  # the model's linears alone, at batch 1 and the profiled batches
    assert bounds["weight_bytes"] > 0 and bounds["read_ms"] > 0 and set(bounds["batches"]) == {"1", "2"}
    assert all(b["eager_ms"] > 0 and b["prepacked_ms"] > 0 for b in bounds["batches"].values())
    assert "linears alone (" in result.stdout
    profiles = report["step_profiles"]
    assert [(p["label"], p["batch"]) for p in profiles] == [("compiled", 1), ("compiled", 2), ("eager", 1), ("eager", 2)]
    for profile in profiles:
        shares = profile["shares"]
        assert profile["step_ms"] > 0 and 0 < shares["linears"] < 1 and 0 < shares["attention"] < 1
        assert sum(shares.values()) == pytest.approx(1)
