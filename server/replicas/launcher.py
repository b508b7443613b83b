"""Starts a replica's shard processes on this host, the way torchrun would, and stops them.

Each shard process gets the replica's whole ShardConfig as one serialized message in a file
(`--config`), and its place in the replica from torchrun's environment variables. Their stderr
comes through the gateway: every line is copied to the gateway's stderr as it comes, except the
line in which a shard states why it stops (SHARD_ERROR_PREFIX), which becomes the message of
the replica's failure, reported once (with tp × pp ranks, each would say the same).

The driver's unix socket lies in a folder of the replica's own (mode 0700, the socket 0600),
which the gateway locks while it lives; a folder left by a gateway that was killed (SIGKILL,
no chance to clean up) is removed by the next gateway's start (remove_stale_folders)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc

from shardgate.proto import shard_pb2
from shardgate.proto.common import SHARD_ERROR_PREFIX, free_port
from shardgate.proto.shard_config import BatchLimits, ReplicaSettings, ShardConfig, settings_of
from shardgate.server.config import ReplicaConfig
from shardgate.server.replicas.client import ReplicaClient

log = logging.getLogger(__name__)
FOLDER_PREFIX = "shardgate-replica"
LOCK_FILE = "gateway.lock"
"""Held (flock) by the gateway that owns the folder, for as long as it lives."""


def remove_stale_folders(parent: str | None = None) -> int:
    """Removes this user's replica folders (socket, shard config) whose gateway is gone — its
    lock free — in parent (the temporary folder); returns how many."""
    parent = parent or tempfile.gettempdir()
    removed = 0
    for name in os.listdir(parent):
        folder = os.path.join(parent, name)
        if not name.startswith(FOLDER_PREFIX) or not os.path.isdir(folder) or os.stat(folder).st_uid != os.getuid():
            continue
        try:
            lock = open(os.path.join(folder, LOCK_FILE), "rb")  # noqa: SIM115 (held while the folder is removed)
        except OSError:
            continue  # being set up, or not ours to judge
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its gateway lives
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d replica folder(s) left by gateways that were killed", removed)
    return removed


def shard_config(
    config: ReplicaConfig, batch_limits: BatchLimits, listen: str, parent_pid: int = 0, log_format: str = "text"
) -> ShardConfig:
    """What each shard process of a replica is told: its settings, the largest step the gateway
    will send, where the driver listens, and how it logs (as the gateway does)."""
    return ShardConfig(
        settings_of(ReplicaSettings, config), settings_of(BatchLimits, batch_limits), listen, parent_pid, log_format=log_format
    )


class _RankStderr:
    """A shard process's stderr, copied to the gateway's stderr line by line by a thread of its
    own, except the shard's stop line, which is kept as `error`."""

    def __init__(self, stream) -> None:
        self.error: str | None = None
        """Why the shard stopped, as it said (without the prefix); None if it did not say."""
        self._thread = threading.Thread(target=self._copy, args=(stream,), name="shard-stderr", daemon=True)
        self._thread.start()

    def _copy(self, stream) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace")
                if line.startswith(SHARD_ERROR_PREFIX):
                    self.error = line.removeprefix(SHARD_ERROR_PREFIX).rstrip()
                else:
                    sys.stderr.write(line)
                    sys.stderr.flush()

    def final_error(self, timeout: float = 2.0) -> str | None:
        """The stop line of a shard that has exited, once its stderr is read to the end."""
        self._thread.join(timeout)
        return self.error


class LocalReplica:
    """The shard processes of one replica on this host; rank 0 (the driver) listens on a unix
    socket that only the gateway uses."""

    def __init__(self, config: ReplicaConfig, batch_limits: BatchLimits, index: int = 0, start: int = 0, log_format: str = "text") -> None:
        self.config = config
        self.log_format = log_format
        self.batch_limits = batch_limits
        """The largest step the gateway will send: the shards profile memory at it."""
        self.index = index
        self.start_number = start
        """0 for the first start of this replica, then one more per restart."""
        self.world_size = config.tp * config.pp
        self._dir = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{index}-")
        self._lock = open(os.path.join(self._dir, LOCK_FILE), "wb")  # noqa: SIM115 (held until stop)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.target = f"unix://{os.path.join(self._dir, 'driver.sock')}"
        self.processes: list[subprocess.Popen] = []
        self._stderr: list[_RankStderr] = []

    def start(self) -> None:
        master_port = free_port()
        config = shard_config(self.config, self.batch_limits, self.target, parent_pid=os.getpid(), log_format=self.log_format)
        config_path = os.path.join(self._dir, "shard-config.pb")
        with open(config_path, "wb") as file:
            file.write(config.to_bytes())
        command = [sys.executable, "-m", "shardgate.shards.main", "--config", config_path]
        for rank in range(self.world_size):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(self.world_size),
                LOCAL_WORLD_SIZE=str(self.world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(master_port),
                SHARDGATE_REPLICA=f"{self.index}:{self.start_number}",  # for fault injection (shards/faults.py)
            )
            # A session of their own: the terminal's Ctrl-C goes to the gateway, which then
            # stops the shards in order; the shards also exit if the gateway dies.
            process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, start_new_session=True)
            self.processes.append(process)
            self._stderr.append(_RankStderr(process.stderr))

    def exit_reason(self, while_starting: bool = False) -> str | None:
        """Why the replica's processes stopped, once one has exited (else None): the first stop
        line a shard wrote, or which rank exited with which code when none wrote one."""
        exited = [rank for rank, process in enumerate(self.processes) if process.poll() is not None]
        if not exited:
            return None
        for rank in exited:
            error = self._stderr[rank].final_error()
            if error is not None:
                return error
        rank = exited[0]
        when = " while starting" if while_starting else ""
        return f"replica {self.index} rank {rank} exited with code {self.processes[rank].returncode}{when}"

    async def wait_ready(self, client: ReplicaClient) -> shard_pb2.DescribeResponse:
        """Waits until the driver answers Describe; fails (exit_reason) if a rank exits, or if time runs out."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            reason = await asyncio.to_thread(self.exit_reason, True)
            if reason is not None:
                raise RuntimeError(reason)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"replica {self.index} did not start within {self.config.start_timeout_s:.0f} s")
            try:
                return await client.describe(timeout=min(1.0, remaining))
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            await asyncio.sleep(0.1)

    async def wait_lost(self) -> None:
        """Raises RuntimeError (exit_reason) once any rank has exited (the replica is lost)."""
        loop = asyncio.get_running_loop()
        exits = [loop.run_in_executor(None, process.wait) for process in self.processes]
        await asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED)
        raise RuntimeError(await asyncio.to_thread(self.exit_reason))

    async def wait_exited(self, timeout: float) -> list[int | None]:
        """Waits up to timeout for every rank to exit by itself; returns their exit codes (None: still running)."""
        await asyncio.to_thread(self._wait_all_exited, time.monotonic() + timeout)
        return [process.poll() for process in self.processes]

    def _wait_all_exited(self, deadline: float) -> None:
        while any(process.poll() is None for process in self.processes) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops every rank within timeout, then removes the socket folder. SIGTERM goes to the
        driver first: it finishes the step in hand and releases the other ranks, which exit by
        themselves. SIGTERM to every rank at once could end one in the middle of a step's
        collective, and the driver would log that step's failure or wait in it until a timeout.
        A rank still running after half the timeout (a driver stuck in a collective with a lost
        rank) gets SIGTERM, and SIGKILL at the end."""
        deadline = time.monotonic() + timeout
        driver = self.processes[0] if self.processes else None
        if driver is not None and driver.poll() is None:
            driver.send_signal(signal.SIGTERM)
        self._wait_all_exited(time.monotonic() + timeout / 2)
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("shard pid %d ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._lock.close()
