"""`shardgate tune` at a small size: a sweep, a PNG that opens, and a recommendation that meets
the SLO when started as printed."""

import json
import subprocess
import sys

from PIL import Image
from servers import start_server

WORKLOAD = ("--num-requests", "8", "--prompt-len", "8", "--output-len", "8", "--concurrency", "4")


def shardgate(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardgate.clients.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_tune_plots_and_recommends_serve_flags_that_meet_the_slo(tmp_path):
    png = tmp_path / "tune.png"
    result = shardgate(
        "tune",
        "--no-compile",
        "--model",
        "builtin:tiny",
        "--kv-cache-memory",
        str(64 << 20),
        "--max-num-seqs",
        "1,4",
        "--max-batch-tokens",
        "256",
        "--embed-max-queue-delay-us",
        "0",
        "--slo-ttft-p99",
        "5000",
        "--slo-itl-p99",
        "2000",
        "--plot",
        str(png),
        *WORKLOAD,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("meets SLO") + result.stderr.count("misses SLO") == 2
    # Embed is swept where the server serves it; otherwise the tuner says why it skipped it.
    assert (
        "skipping the Embed queue-delay sweep: this server does not implement Embed (UNIMPLEMENTED)" in result.stderr
        or "Embed calls/s" in result.stderr
    )
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 1000
        image.load()  # decodes: the file is whole
    lines = result.stdout.splitlines()
    assert lines[0] == f"plot: {png}" and lines[1].startswith("recommended (throughput): ")
    command = lines[-1].split()
    assert command[:2] == ["shardgate", "serve"] and command[2:6] == ["--model", "builtin:tiny", "--kv-cache-memory", str(64 << 20)]
    assert "--max-num-seqs" in command and "--max-batch-tokens" in command

    server = start_server(tmp_path, *command[2:])  # started exactly as printed
    try:
        follow_up = shardgate("bench", "--addr", server.address, *WORKLOAD, "--json", "-")
    finally:
        server.stop()
    assert follow_up.returncode == 0, follow_up.stderr
    summary = json.loads(follow_up.stdout)["levels"][0]["results"]["shardgate"]
    assert summary["errors"] == 0 and summary["ttft_ms"]["p99"] <= 5000 and summary["itl_ms"]["p99"] <= 2000


def test_tune_says_when_nothing_meets_the_slo(tmp_path):
    result = shardgate(
        "tune",
        "--no-compile",
        "--model",
        "builtin:tiny",
        "--kv-cache-memory",
        str(64 << 20),
        "--max-num-seqs",
        "2",
        "--max-batch-tokens",
        "64",
        "--no-embed",
        "--slo-ttft-p99",
        "0.001",
        "--plot",
        str(tmp_path / "t.png"),
        *WORKLOAD,
    )
    assert result.returncode == 1 and "no setting meets the SLO" in result.stdout and (tmp_path / "t.png").stat().st_size > 0
