"""Starts real `shardgate serve` processes for tests, on loopback and free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardgate.clients import Client
from shardgate.proto import inference_pb2_grpc
from shardgate.proto.common import free_port
from shardgate.proto.models import TINY


@contextmanager
def raw_stub(address: str, timeout: float = 30) -> Iterator[inference_pb2_grpc.InferenceStub]:
    """A bare Inference stub on a channel of its own, connected before it is handed out.

    For tests that speak protobuf to the server directly: messages the client library would
    refuse or reshape (bad fields, oversized requests), call objects (futures, `cancel()`),
    and raw status codes and details without the client's exception mapping or retries.
    """
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        yield inference_pb2_grpc.InferenceStub(channel)


@dataclass
class RunningServer:
    process: subprocess.Popen
    address: str
    log_path: Path

    def client(self, timeout: float | None = 120) -> Client:
        return Client(self.address, timeout=timeout)

    def raw_stub(self):
        """`raw_stub(address)` of this server: use it as a context manager."""
        return raw_stub(self.address)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def launch_server(log_dir: Path, *args: str, env: dict[str, str] | None = None) -> RunningServer:
    """Starts the gateway with the given `shardgate serve` flags (and extra environment
    variables); returns at once. Without --model it serves builtin:tiny (not serve's default,
    builtin:smollm2 when its wheel is installed: the tests stay fast), and without --compile
    it passes --no-compile."""
    if "--model" not in args:
        args = ("--model", TINY, *args)
    if "--compile" not in args:  # compiling every bucket takes tens of seconds: only the compile tests ask for it
        args = (*args, "--no-compile")
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "shardgate.clients.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return RunningServer(process, f"127.0.0.1:{port}", log_path)


def start_server(
    log_dir: Path,
    *args: str,
    timeout: float = 180,
    credentials: grpc.ChannelCredentials | None = None,
    env: dict[str, str] | None = None,
) -> RunningServer:
    """Starts the gateway with the given `shardgate serve` flags and waits until its health
    check says SERVING (over TLS with `credentials`, for a server started with --tls-cert)."""
    server = launch_server(log_dir, *args, env=env)
    process = server.process
    deadline = time.monotonic() + timeout
    if credentials is None:
        channel = grpc.insecure_channel(server.address)
    else:
        channel = grpc.secure_channel(server.address, credentials)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return server
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"server did not start in {timeout} s:\n{server.log()}")
            time.sleep(0.05)


def wait_until(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    """Polls condition() until it holds; for server-side effects the client has no event for
    (a cancelled call's cleanup, a request reaching the queue)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.02)
