"""The supervisor with no shard processes: a remote replica whose driver is an in-process fake
of the Shard service (or nothing at all)."""

import asyncio
import time
from dataclasses import dataclass

import grpc
from fake_replica import ScriptedReplica

from shardgate.proto import inference_pb2, shard_pb2, shard_pb2_grpc
from shardgate.server.block_manager import BlockManager
from shardgate.server.config import GatewayConfig, ReplicaConfig, SchedulerConfig, SupervisionConfig
from shardgate.server.engine import Engine
from shardgate.server.replicas.client import ReplicaClient
from shardgate.server.replicas.supervisor import ReplicaSupervisor
from shardgate.server.scheduler import Scheduler
from shardgate.shards.builtin import EOS_ID, builtin_tokenizer


class FakeDriver(shard_pb2_grpc.ShardServicer):
    async def Attach(self, request, context):
        yield shard_pb2.AttachResponse(session_id="fake")
        await asyncio.Event().wait()  # the session lasts while the call does

    async def Describe(self, request, context):
        return shard_pb2.DescribeResponse(
            model=inference_pb2.ModelInfoResponse(model="fake"), num_kv_blocks=8, block_size=4, tokenizer_json=builtin_tokenizer().to_str()
        )


class FailedClient(ScriptedReplica):
    """The engine's client of the replica that failed."""

    def __init__(self, target: str) -> None:
        super().__init__({})
        self.target = target
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    def reconnected(self) -> ReplicaClient:
        return ReplicaClient(self.target)


@dataclass(frozen=True)
class RecordedBackoff(SupervisionConfig):
    """Records each restart attempt's backoff as the supervisor asks for it."""

    asked: list = None

    def backoff(self, attempt: int) -> float:
        self.asked.append(attempt)
        return super().backoff(attempt)


def supervise(target: str, attempts: int, driver: bool):
    supervision = RecordedBackoff(restart_attempts=attempts, restart_backoff_s=0.01, asked=[])
    config = GatewayConfig(supervision=supervision, replica=ReplicaConfig(start_timeout_s=0.2))

    async def main():
        server = None
        if driver:
            server = grpc.aio.server()
            shard_pb2_grpc.add_ShardServicer_to_server(FakeDriver(), server)
            server.add_insecure_port(target)
            await server.start()
        failed = FailedClient(target)
        engine = Engine(0, Scheduler(SchedulerConfig(), BlockManager(64, 4)), failed, builtin_tokenizer(), (EOS_ID,))
        changes = []

        async def on_change():
            changes.append(engine.healthy)

        supervisor = ReplicaSupervisor(engine, config, on_change)
        task = asyncio.create_task(supervisor.run())
        await asyncio.sleep(0)
        start = time.monotonic()
        engine.fail("test")
        if driver:

            async def restarted():
                while supervisor.restarts == 0:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(restarted(), 10)
            task.cancel()
        else:
            await asyncio.wait_for(task, 10)  # run() returns once it gives up
        elapsed = time.monotonic() - start
        result = (engine, supervisor, failed, changes, elapsed)
        await supervisor.stop()
        if server is not None:
            await server.stop(None)
        return result

    return supervision, asyncio.run(main())


def test_a_failed_replica_is_reconnected_after_a_backoff_with_a_fresh_cache(tmp_path):
    supervision, (engine, supervisor, failed, changes, elapsed) = supervise(f"unix://{tmp_path}/driver.sock", attempts=3, driver=True)
    assert supervision.asked == [1] and elapsed >= supervision.restart_backoff_s
    assert supervisor.restarts == 1 and engine.healthy and failed.closed and engine.replica is not failed
    status = engine.scheduler.status()
    assert (status.total_blocks, status.free_blocks) == (8, 8)
    assert changes == [False, True]  # health told when it failed and when it serves again


def test_the_supervisor_gives_up_after_its_attempts(tmp_path):
    supervision, (engine, supervisor, failed, changes, elapsed) = supervise(f"unix://{tmp_path}/nobody.sock", attempts=3, driver=False)
    assert supervision.asked == [1, 2, 3]  # backoffs 0.01, 0.02, 0.04 s
    assert elapsed >= 0.01 + 0.02 + 0.04 and supervisor.restarts == 0
    assert not engine.healthy and engine.replica is failed and changes == [False]


class CrashingSupervisor(ReplicaSupervisor):
    """Its own code fails (not the replica's start) the first `crashes` times it replaces the replica."""

    def __init__(self, *args, crashes: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crashes = crashes

    async def _start(self):
        if self.crashes:
            self.crashes -= 1
            raise TypeError("a bug in the supervisor")
        return await super()._start()


def supervise_crashing(target: str, crashes: int, attempts: int):
    config = GatewayConfig(supervision=SupervisionConfig(restart_attempts=attempts, restart_backoff_s=0.01))

    async def main():
        server = grpc.aio.server()
        shard_pb2_grpc.add_ShardServicer_to_server(FakeDriver(), server)
        server.add_insecure_port(target)
        await server.start()
        engine = Engine(0, Scheduler(SchedulerConfig(), BlockManager(64, 4)), FailedClient(target), builtin_tokenizer(), (EOS_ID,))
        changes = []

        async def on_change():
            changes.append(engine.healthy)

        supervisor = CrashingSupervisor(engine, config, on_change, crashes=crashes)
        task = asyncio.create_task(supervisor.run())
        await asyncio.sleep(0)
        engine.fail("test")
        deadline = time.monotonic() + 10
        while supervisor.restarts == 0 and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        gave_up = task.done() and task.exception() is None
        task.cancel()
        await supervisor.stop()
        await server.stop(None)
        return engine, supervisor, changes, gave_up

    return asyncio.run(main())


def test_a_failing_supervisor_is_noticed_and_supervision_starts_over(tmp_path):
    engine, supervisor, changes, gave_up = supervise_crashing(f"unix://{tmp_path}/driver.sock", crashes=2, attempts=3)
    assert supervisor.restarts == 1 and engine.healthy and not gave_up
    assert changes[0] is False and changes[-1] is True


def test_a_supervisor_that_keeps_failing_leaves_its_replica_down(tmp_path):
    engine, supervisor, changes, gave_up = supervise_crashing(f"unix://{tmp_path}/driver.sock", crashes=100, attempts=2)
    assert gave_up and supervisor.restarts == 0 and not engine.healthy and changes[-1] is False


class StoppingDriver(FakeDriver):
    """Its first session is told that the driver stops (SIGTERM) once `stop` is set."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.sessions = 0
        self.first_ended = asyncio.Event()

    async def Attach(self, request, context):
        self.sessions += 1
        if self.sessions > 1:
            async for message in super().Attach(request, context):
                yield message
            return
        try:
            yield shard_pb2.AttachResponse(session_id="first")
            await self.stop.wait()
            yield shard_pb2.AttachResponse(stopping=True)
            await asyncio.Event().wait()
        finally:
            self.first_ended.set()


def test_a_remote_driver_that_says_it_stops_is_handed_over_its_session_ended_and_reconnected(tmp_path):
    target = f"unix://{tmp_path}/driver.sock"
    config = GatewayConfig(supervision=SupervisionConfig(restart_backoff_s=0.01), replica=ReplicaConfig(start_timeout_s=2))

    async def main():
        driver = StoppingDriver()
        server = grpc.aio.server()
        shard_pb2_grpc.add_ShardServicer_to_server(driver, server)
        server.add_insecure_port(target)
        await server.start()
        client = ReplicaClient(target)
        await client.describe(timeout=5)
        engine = Engine(0, Scheduler(SchedulerConfig(), BlockManager(64, 4)), client, builtin_tokenizer(), (EOS_ID,))
        causes = []
        engine.on_orphans = lambda handles, cause: causes.append(cause)

        async def on_change():
            pass

        supervisor = ReplicaSupervisor(engine, config, on_change)
        tasks = [asyncio.create_task(engine.run()), asyncio.create_task(supervisor.run())]
        driver.stop.set()
        await asyncio.wait_for(driver.first_ended.wait(), 10)  # the gateway let go of the stopping driver
        while supervisor.restarts == 0:
            await asyncio.sleep(0.01)
        result = causes, client.stopping, engine.healthy, driver.sessions
        for task in tasks:
            task.cancel()
        await supervisor.stop()
        await server.stop(None)
        return result

    causes, told, healthy, sessions = asyncio.run(main())
    assert causes == ["preemption"] and told and healthy and sessions == 2
