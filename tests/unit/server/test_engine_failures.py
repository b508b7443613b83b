"""How the engine notices a failing replica: any exception in its loop, a call past the deadline
its measured step times give, an idle replica's unanswered heartbeat."""

import asyncio

import grpc
from fake_replica import ScriptedReplica

from shardgate.server.block_manager import BlockManager
from shardgate.server.config import SchedulerConfig, SupervisionConfig
from shardgate.server.engine import Engine
from shardgate.server.output_processor import ErrorEvent, FinishEvent
from shardgate.server.request import SamplingParams
from shardgate.server.scheduler import Scheduler
from shardgate.server.validation import ValidRequest
from shardgate.shards.builtin import builtin_tokenizer

TOKENIZER = builtin_tokenizer()
EOS = 300
SCRIPTS = {10: [72]}


def valid(max_new_tokens: int) -> ValidRequest:
    return ValidRequest("r", [10, 1, 2], SamplingParams(max_new_tokens, 0.0, 1.0, 0, 0, True, False), [])


async def drain(handle):
    events = []
    while not events or not isinstance(events[-1], (FinishEvent, ErrorEvent)):
        events.append(await asyncio.wait_for(handle.events.get(), 5))
    return events


def make_engine(replica, supervision: SupervisionConfig | None = None, async_scheduling: bool = True) -> Engine:
    config = SchedulerConfig(decode_steps=1, async_scheduling=async_scheduling)
    return Engine(0, Scheduler(config, BlockManager(64, 4)), replica, TOKENIZER, (EOS,), supervision=supervision)


class BrokenReplica(ScriptedReplica):
    """Its step raises something other than an RPC error (a bug in a response's handling, say)."""

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        if plan.step_id == 3:
            raise KeyError("no such sequence")
        return await super().step(plan)


class TimedReplica(ScriptedReplica):
    """Records each call's deadline; steps take `step_s`; heartbeats answer or time out."""

    def __init__(self, step_s: float = 0.0) -> None:
        super().__init__(SCRIPTS)
        self.step_s = step_s
        self.timeouts: list[float | None] = []
        self.heartbeats = 0
        self.heartbeat_answers = True

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        self.timeouts.append(timeout)
        await asyncio.sleep(self.step_s)
        return await super().step(plan)

    async def heartbeat(self, timeout=None):
        self.heartbeats += 1
        if not self.heartbeat_answers:
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, None, None, details="Deadline Exceeded")


def test_an_exception_other_than_an_rpc_error_fails_only_the_replica_and_the_loop_goes_on():
    async def scenario():
        engine = make_engine(BrokenReplica(SCRIPTS))
        loop = asyncio.create_task(engine.run())
        events = await drain(engine.submit(valid(max_new_tokens=10)))
        failed = engine.failed.is_set()
        engine.restore(ScriptedReplica(SCRIPTS), Scheduler(SchedulerConfig(decode_steps=1), BlockManager(64, 4)))
        after = await drain(engine.submit(valid(max_new_tokens=3)))
        loop_alive = not loop.done()
        loop.cancel()
        return events, failed, after, loop_alive

    events, failed, after, loop_alive = asyncio.run(scenario())
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == grpc.StatusCode.UNAVAILABLE and failed
    assert isinstance(after[-1], FinishEvent) and len(after) == 3 + 1 and loop_alive  # 3 tokens, then the finish


def test_step_deadlines_start_at_the_ceiling_and_then_follow_the_measured_steps():
    supervision = SupervisionConfig(step_timeout_s=60, step_timeout_multiple=8, step_timeout_floor_s=0.5, heartbeat_interval_s=0)

    async def scenario():
        replica = TimedReplica(step_s=0.1)
        engine = make_engine(replica, supervision, async_scheduling=False)  # each step planned after the one before answered
        loop = asyncio.create_task(engine.run())
        await drain(engine.submit(valid(max_new_tokens=4)))
        loop.cancel()
        return replica.timeouts

    prefill, first_decode, *decodes = asyncio.run(scenario())
    assert prefill == 60  # nothing measured yet: the ceiling (--step-timeout)
    assert 0.5 <= first_decode < 2  # a decode step borrows the prefill's measured time: 8 × ~0.1 s
    assert all(0.5 <= t < 2 for t in decodes)


def test_an_idle_replica_gets_heartbeats_and_an_unanswered_one_fails_it():
    supervision = SupervisionConfig(heartbeat_interval_s=0.05, step_timeout_floor_s=1)

    async def scenario():
        replica = TimedReplica()
        engine = make_engine(replica, supervision)
        loop = asyncio.create_task(engine.run())
        await asyncio.sleep(0.4)
        answered, healthy = replica.heartbeats, engine.healthy
        replica.heartbeat_answers = False
        await asyncio.wait_for(engine.failed.wait(), 2)
        loop.cancel()
        return answered, healthy

    answered, healthy = asyncio.run(scenario())
    assert answered >= 3 and healthy


class ClosedUnderStepReplica(ScriptedReplica):
    """Its step is cancelled once `close` is set, as a grpc.aio call is when its channel closes."""

    def __init__(self) -> None:
        super().__init__(SCRIPTS)
        self.in_step = asyncio.Event()
        self.close = asyncio.Event()

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        self.in_step.set()
        await self.close.wait()
        raise asyncio.CancelledError()


def test_a_step_cancelled_by_the_supervisor_closing_a_failed_replicas_channel_does_not_end_the_loop():
    async def scenario():
        replica = ClosedUnderStepReplica()
        engine = make_engine(replica)
        loop = asyncio.create_task(engine.run())
        handle = engine.submit(valid(max_new_tokens=3))
        await asyncio.wait_for(replica.in_step.wait(), 5)
        engine.fail("a rank exited")  # as the supervisor does when it sees a rank exit
        replica.close.set()  # then closes the channel: the step in flight is cancelled
        await asyncio.sleep(0.05)
        survived = not loop.done()
        engine.restore(ScriptedReplica(SCRIPTS), Scheduler(SchedulerConfig(decode_steps=1), BlockManager(64, 4)))
        after = await drain(engine.submit(valid(max_new_tokens=3)))
        loop.cancel()
        return survived, await drain(handle), after

    survived, failed, after = asyncio.run(scenario())
    assert survived and isinstance(failed[-1], ErrorEvent) and isinstance(after[-1], FinishEvent)
