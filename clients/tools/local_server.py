"""Starts and stops a `shardgate serve` process on loopback (for bench and tune)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shardgate.clients.client import Client
from shardgate.clients.errors import DeadlineExceeded, Unavailable
from shardgate.proto.common import free_port


class LocalServer:
    """`with LocalServer(["--model", "builtin:tiny"]) as server: ...server.address...`; its
    output goes to a log file (named in errors)."""

    def __init__(self, serve_args: list[str], log_dir: Path | None = None, start_timeout_s: float = 1200) -> None:
        self.serve_args = list(serve_args)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="shardgate-bench-"))
        self.log_path = log_dir / f"server-{self.port}.log"
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalServer:
        command = [
            sys.executable,
            "-m",
            "shardgate.clients.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.serve_args,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        with Client(self.address, timeout=5) as client:
            while True:  # the port answers before the model has loaded: wait for SERVING
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"`shardgate serve {' '.join(self.serve_args)}` exited with {self.process.returncode}:\n{self._log_tail()}"
                    )
                try:
                    if client.health() == "SERVING":
                        return self
                except (Unavailable, DeadlineExceeded):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the server did not start in {self.start_timeout_s:.0f} s; log: {self.log_path}")
                time.sleep(0.2)

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_actions() -> list:
    """The `shardgate serve` flags (from the server's own CLI module: flags only, no server code)."""
    from shardgate.server import cli as server_cli

    parser = argparse.ArgumentParser(add_help=False)
    server_cli.add_arguments(parser)
    return parser._actions


def serve_argv(args, skip: frozenset[str] = frozenset({"host", "port"})) -> list[str]:
    """The `shardgate serve` flags that `args` (parsed with serve's flags among others) sets
    away from their defaults, as an argv; --model always, so the command says what it serves."""
    argv = []
    for action in serve_actions():
        if action.dest in skip or not action.option_strings or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default and action.dest != "model":
            continue
        if action.nargs == 0:  # a switch
            if value:
                argv.append(action.option_strings[0])
            elif isinstance(action, argparse.BooleanOptionalAction):
                argv.append(action.option_strings[1])  # its --no- form
        else:
            text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
            argv += [action.option_strings[0], text]
    return argv
