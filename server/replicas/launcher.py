"""Starts a replica's shard processes on this host, the way torchrun would, and stops them.

Each shard process gets the replica's whole ShardConfig as one serialized message in a file
(`--config`), and its place in the replica from torchrun's environment variables."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc

from shardgate.proto import shard_pb2
from shardgate.proto.common import free_port
from shardgate.proto.shard_config import BatchLimits, ReplicaSettings, ShardConfig, settings_of
from shardgate.server.config import ReplicaConfig
from shardgate.server.replicas.client import ReplicaClient

log = logging.getLogger(__name__)


def shard_config(config: ReplicaConfig, batch_limits: BatchLimits, listen: str, parent_pid: int = 0) -> ShardConfig:
    """What each shard process of a replica is told: its settings, the largest step the gateway
    will send, and where the driver listens."""
    return ShardConfig(settings_of(ReplicaSettings, config), settings_of(BatchLimits, batch_limits), listen, parent_pid)


class LocalReplica:
    """The shard processes of one replica on this host; rank 0 (the driver) listens on a unix
    socket that only the gateway uses."""

    def __init__(self, config: ReplicaConfig, batch_limits: BatchLimits, index: int = 0, start: int = 0) -> None:
        self.config = config
        self.batch_limits = batch_limits
        """The largest step the gateway will send: the shards profile memory at it."""
        self.index = index
        self.start_number = start
        """0 for the first start of this replica, then one more per restart."""
        self.world_size = config.tp * config.pp
        self._dir = tempfile.mkdtemp(prefix=f"shardgate-replica{index}-")
        self.target = f"unix://{os.path.join(self._dir, 'driver.sock')}"
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        master_port = free_port()
        config = shard_config(self.config, self.batch_limits, self.target, parent_pid=os.getpid())
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
            self.processes.append(subprocess.Popen(command, env=env, start_new_session=True))

    async def wait_ready(self, client: ReplicaClient) -> shard_pb2.DescribeResponse:
        """Waits until the driver answers Describe; fails if a rank exits or time runs out."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            for rank, process in enumerate(self.processes):
                if process.poll() is not None:
                    raise RuntimeError(f"replica {self.index} rank {rank} exited with code {process.returncode} while starting")
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
        """Raises RuntimeError once any rank has exited (the replica is lost)."""
        loop = asyncio.get_running_loop()
        exits = {loop.run_in_executor(None, process.wait): rank for rank, process in enumerate(self.processes)}
        done, _ = await asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED)
        rank = exits[done.pop()]
        raise RuntimeError(f"replica {self.index} rank {rank} exited with code {self.processes[rank].returncode}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every rank, SIGKILL what is left after timeout, remove the socket folder."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("shard pid %d ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
