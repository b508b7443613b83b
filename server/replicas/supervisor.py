"""Replica supervision: notice a failed replica, stop all its processes, start it again.

A replica fails when one of its ranks exits, when a step errors, or when a step goes unanswered
for --step-timeout (a hung or stopped rank). Its engine then hands its generations to the router
(they continue on other replicas), the supervisor stops every process of the replica, and
restarts it with exponential backoff, giving up after --restart-attempts failed tries in a row.
A remote replica (started by torchrun elsewhere) cannot be restarted from here: its supervisor
reconnects, with the same backoff, until its driver answers again.

A replica whose driver got SIGTERM (a spot node being reclaimed) is handed over rather than
failed: once its engine has moved its generations, the supervisor ends the session (the driver's
cue to stop), lets the processes exit by themselves (logging their exit codes), and then brings
the replica back as after a crash: a local one is started again (the same host, so the same
flags serve), a remote one is reconnected once its driver (restarted by torchrun or Kubernetes
on a new node) answers.

The supervisor's own failure (an exception in its task) is logged and fails its replica (so its
requests move and ServerStatus shows it down), and supervision starts over, which replaces the
replica's processes: one replica's broken supervision must not take down a gateway whose other
replicas serve. After --restart-attempts such failures in a row the replica stays down, as after
failed restarts (health turns NOT_SERVING once no replica can serve).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from shardgate.proto import shard_pb2
from shardgate.server.block_manager import BlockManager
from shardgate.server.config import GatewayConfig
from shardgate.server.engine import Engine
from shardgate.server.replicas.client import ReplicaClient
from shardgate.server.replicas.launcher import LocalReplica
from shardgate.server.scheduler import Scheduler

log = logging.getLogger(__name__)
EXIT_WAIT_S = 30.0
"""How long a preempted local replica's processes get to exit by themselves once its session has
ended (its driver stops within its own grace, 25 s)."""


class ReplicaSupervisor:
    def __init__(
        self,
        engine: Engine,
        config: GatewayConfig,
        on_change: Callable[[], Awaitable[None]],
        replica: LocalReplica | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.on_change = on_change
        self.replica = replica
        """The current processes of a local replica (None for a remote one)."""
        self.restarts = 0

    async def run(self) -> None:
        """Supervises the replica until it stays down."""
        crashes, restarts = 0, self.restarts
        while True:
            try:
                await self._supervise()
                return
            except Exception as error:
                crashes = 1 if self.restarts > restarts else crashes + 1  # in a row: since the replica last came back
                restarts = self.restarts
                log.exception("replica %d: its supervisor failed (%d in a row)", self.engine.index, crashes)
                self.engine.fail(f"its supervisor failed: {type(error).__name__}: {error}")
                if crashes > self.config.supervision.restart_attempts:
                    log.error("replica %d stays down: its supervisor failed %d times in a row", self.engine.index, crashes)
                    if self.replica is not None:
                        await asyncio.to_thread(self.replica.stop, 2.0)
                    self.engine.abandon()
                    await self.on_change()
                    return

    async def _supervise(self) -> None:
        while True:
            await self._until_failure()
            await self.on_change()
            if not await self._replace():
                log.error("replica %d stays down after %d failed restarts", self.engine.index, self.config.supervision.restart_attempts)
                self.engine.abandon()
                return
            self.restarts += 1
            await self.on_change()

    async def _until_failure(self) -> None:
        """Waits for the replica to fail (a rank exits, or the engine saw a step fail)."""
        waits = {asyncio.create_task(self.engine.failed.wait())}
        if self.replica is not None:
            waits.add(asyncio.create_task(self.replica.wait_lost()))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        for task in done:
            if task.exception() is not None:
                self.engine.fail(str(task.exception()))

    async def _replace(self) -> bool:
        """Stops the failed replica and brings up a new one; False when every attempt failed."""
        # Ends the session first: a driver serves one at a time, a stopping one stops once it has
        # ended, and one that gets SIGTERM with no session open stops at once. (A call the engine
        # still awaits is cancelled: the engine knows its replica failed.)
        await self.engine.replica.close()
        if self.replica is not None:
            if self.engine.preempted:
                codes = await self.replica.wait_exited(EXIT_WAIT_S)
                log.info("replica %d: its processes exited with codes %s after its driver's SIGTERM", self.engine.index, codes)
            await asyncio.to_thread(self.replica.stop, 2.0)
        supervision = self.config.supervision
        for attempt in range(1, supervision.restart_attempts + 1):
            await asyncio.sleep(supervision.backoff(attempt))
            try:
                client, info = await self._start()
            except (RuntimeError, grpc.aio.AioRpcError) as error:
                log.warning("replica %d restart %d failed: %s", self.engine.index, attempt, error)
                continue
            scheduler = Scheduler(self.config.scheduler, BlockManager(info.num_kv_blocks, info.block_size))
            self.engine.restore(client, scheduler)
            log.info("replica %d is serving again (restart %d)", self.engine.index, attempt)
            return True
        return False

    async def _start(self) -> tuple[ReplicaClient, shard_pb2.DescribeResponse]:
        if self.replica is None:  # remote: reconnect to the same driver
            client = self.engine.replica.reconnected()
            try:
                return client, await client.describe(timeout=self.config.replica.start_timeout_s)
            except grpc.aio.AioRpcError:
                await client.close()
                raise
        replica = LocalReplica(
            self.config.replica,
            self.config.scheduler,
            self.engine.index,
            start=self.restarts + 1,
            log_format=self.config.telemetry.log_format,
        )
        client = ReplicaClient(replica.target)
        self.replica = replica
        replica.start()
        try:
            return client, await replica.wait_ready(client)
        except RuntimeError:
            await client.close()
            await asyncio.to_thread(replica.stop, 2.0)
            raise

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.engine.replica.close()
        if self.replica is not None:
            await asyncio.to_thread(self.replica.stop)
