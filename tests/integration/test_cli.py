"""The `shardgate` command as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_gguf import write_gguf


def shardgate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardgate.clients.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_streams_from_a_running_server(tiny_server, client):
    expected = client.generate("cli prompt", max_new_tokens=12, temperature=0, ignore_eos=True).text
    result = shardgate(
        "generate", "--addr", tiny_server.address, "--stream", "--max-new-tokens", "12", "--temperature", "0", "--ignore-eos", "cli prompt"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "[length: " in result.stderr and "12 generated tokens" in result.stderr


def test_generate_reports_bad_input_as_a_status(tiny_server):
    result = shardgate("generate", "--addr", tiny_server.address, "--top-k", "-3", "x")
    assert result.returncode == 1 and "INVALID_ARGUMENT: top_k:" in result.stderr and "Traceback" not in result.stderr


def test_demo_starts_a_server_and_streams():
    result = shardgate("demo", "--model", "builtin:tiny", "--max-new-tokens", "8", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The quick brown fox")
    assert "[serving builtin:tiny" in result.stderr and "8 generated tokens" in result.stderr


def test_demo_serves_builtin_smollm2_by_default_when_installed(smollm2_gguf):
    result = shardgate("demo", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "[serving builtin:smollm2 (llama, " in result.stderr


def test_serve_rejects_a_bad_flag_without_traceback():
    result = shardgate("serve", "--dtype", "float64", timeout=60)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_serve_exits_naming_the_flag_when_the_kv_budget_does_not_fit():
    flags = ("--port", "0", "--model", "builtin:tiny", "--kv-cache-memory", "1e15", "--max-batch-tokens", "64")
    result = shardgate("serve", *flags, timeout=120)
    assert result.returncode != 0
    assert "lower --kv-cache-memory" in result.stderr and "Traceback" not in result.stderr


def test_serve_rejects_inconsistent_settings_without_traceback():
    result = shardgate("serve", "--embed-max-batch-size", "8", "--embed-max-inputs", "16", timeout=60)
    assert result.returncode == 2 and "max_inputs must be in [1, 8]" in result.stderr and "Traceback" not in result.stderr


def test_info_shows_health_and_model_of_a_running_server(tiny_server):
    result = shardgate("info", "--addr", tiny_server.address)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert fields["health"] == "SERVING" and fields["model"] == "builtin:tiny" and fields["devices"] == "cpu"


def write_bad_gguf(path: Path, problem: str) -> Path:
    if problem == "not GGUF":
        path.write_text("this is not a model\n")
    elif problem == "truncated":
        whole = write_gguf(path.with_name("whole.gguf"), "Q8_0").read_bytes()
        path.write_bytes(whole[: len(whole) - 1000])
    else:
        write_gguf(path, "F32", arch="phi3")  # the checks stop at the architecture
    return path


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("not GGUF", "not a GGUF file (it does not start with the GGUF magic number)"),
        ("truncated", "truncated or corrupt GGUF file"),
        ("architecture", "GGUF architecture 'phi3' is not supported; supported: llama, qwen2"),
    ],
)
def test_serve_reports_a_bad_gguf_in_one_line_naming_the_file(tmp_path, problem, message):
    bad = write_bad_gguf(tmp_path / "model.gguf", problem)
    result = shardgate("serve", "--port", "0", "--device", "cpu", "--tp", "2", "--model", str(bad), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    # Both ranks fail alike; the user reads the reason once, and nothing else names the failure.
    errors = [line for line in result.stderr.splitlines() if str(bad) in line or "error" in line.lower() or "exited" in line]
    assert len(errors) == 1 and errors[0].startswith(f"shardgate serve: error: {bad}: {message}"), result.stderr
