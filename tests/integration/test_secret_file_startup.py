"""`shardgate serve` with a key or token file that cannot serve stops in one line (no
traceback, nothing started); one that others can read starts, with one warning line."""

import subprocess
import sys

import pytest
from servers import start_server

SERVE = [sys.executable, "-m", "shardgate.clients.cli", "serve", "--port", "0"]


@pytest.mark.parametrize(
    "flag, content, message",
    [
        ("--api-key-file", None, "cannot read it (No such file or directory)"),
        ("--api-key-file", "\n \n", "the file is empty"),
        ("--api-key-file", "folder", "cannot read it (Is a directory)"),
        ("--replica-token-file", "short", "the token is shorter than 16 characters"),
    ],
)
def test_a_key_or_token_file_that_cannot_serve_stops_serve_in_one_line(tmp_path, flag, content, message):
    path = tmp_path / "secret"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    extra = ["--remote-replica", "127.0.0.1:1"] if flag == "--replica-token-file" else []
    result = subprocess.run([*SERVE, flag, str(path), *extra], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"shardgate serve: error: {flag} {path}: {message}")


def test_a_key_file_others_can_read_starts_with_one_warning(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("a-key\n")
    keys.chmod(0o644)
    server = start_server(tmp_path, "--kv-cache-memory", str(16 << 20), "--api-key-file", str(keys))
    server.stop()
    warnings = [line for line in server.log().splitlines() if "WARNING" in line and str(keys) in line]
    assert len(warnings) == 1 and "is readable by group and others (mode 0644)" in warnings[0], server.log()
    assert "cross the network in the clear" not in server.log()  # 127.0.0.1: keys stay on this machine
