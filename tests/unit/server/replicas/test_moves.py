"""Generations moving off a failed or stopping replica: they continue on another one with their
tokens and output state, spend retries only for failures, and with --resume-on-restart wait
for a replica to come back."""

import asyncio
import time

import grpc
from fake_replica import ScriptedReplica

from shardgate.server.block_manager import BlockManager
from shardgate.server.config import SchedulerConfig
from shardgate.server.delivery import OutputStream
from shardgate.server.engine import PREEMPTION, Engine
from shardgate.server.output_processor import ErrorEvent, FinishEvent, TokenEvent
from shardgate.server.replicas.client import plan_to_proto
from shardgate.server.replicas.router import Router
from shardgate.server.request import FinishReason, SamplingParams
from shardgate.server.scheduler import Scheduler
from shardgate.server.validation import ValidRequest
from shardgate.shards.builtin import EOS_ID, builtin_tokenizer

TOKENIZER = builtin_tokenizer()
SCRIPT = [ord(c) for c in "abcdefghijklmnop"]


class RecordingReplica(ScriptedReplica):
    """Keeps each step's message as the replica receives it."""

    def __init__(self, scripts) -> None:
        super().__init__(scripts)
        self.messages = []

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        self.messages.append(plan_to_proto(plan))
        return await super().step(plan)


def valid(stop=()) -> ValidRequest:
    """12 tokens of SCRIPT (the replicas' answer to a prompt starting with 7)."""
    return ValidRequest("r", [7, 1, 2], SamplingParams(12, 0.0, 1.0, 0, 1234, True, False), list(stop))


def new_scheduler() -> Scheduler:
    return Scheduler(SchedulerConfig(decode_steps=1), BlockManager(64, 4))


def make_engines(*replicas) -> list[Engine]:
    return [Engine(index, new_scheduler(), replica, TOKENIZER, (EOS_ID,)) for index, replica in enumerate(replicas)]


async def drain(handle) -> list:
    events = []
    while not events or not isinstance(events[-1], (FinishEvent, ErrorEvent)):
        events.append(await asyncio.wait_for(handle.events.get(), 5))
    return events


def text_of(events) -> str:
    return "".join(event.text for event in events if not isinstance(event, ErrorEvent))


def tokens_of(events) -> list[int]:
    return [event.token_id for event in events if isinstance(event, TokenEvent)]


def test_a_generation_continues_on_another_replica_with_its_tokens_at_their_positions():
    async def scenario():
        dying, healthy = ScriptedReplica({7: SCRIPT}, fail_at_step=5), RecordingReplica({7: SCRIPT})
        engines = make_engines(dying, healthy)
        handle = Router(engines).submit(valid())  # on replica 0: the first of equals
        loops = [asyncio.create_task(engine.run()) for engine in engines]
        events = await drain(handle)
        for loop in loops:
            loop.cancel()
        return events, handle, healthy.messages

    events, handle, plans = asyncio.run(scenario())
    assert tokens_of(events) == SCRIPT[:12] and text_of(events) == "abcdefghijkl"  # nothing repeated or lost
    assert isinstance(events[-1], FinishEvent) and events[-1].reason is FinishReason.LENGTH
    assert handle.replica == 1 and handle.request.num_resumes == 1 and handle.retries == 1
    first = plans[0].chunks[0]
    # replica 0 answered 4 steps (a prefill, 3 decodes): replica 1 recomputes prompt + those 4
    # tokens from position 0 and samples token 5 with its original output index (seeded draws)
    assert list(first.token_ids) == [7, 1, 2, *SCRIPT[:4]] and first.start_pos == 0 and first.output_index == 4
    assert first.sample and first.sampling.seed == 1234


def test_a_stop_string_across_the_seam_is_matched_and_cut_once():
    async def scenario():
        engines = make_engines(ScriptedReplica({7: SCRIPT}, fail_at_step=4), ScriptedReplica({7: SCRIPT}))
        handle = Router(engines).submit(valid(stop=["cd"]))  # "c" is the 3rd token, made before the failure at step 4; "d" after
        loops = [asyncio.create_task(engine.run()) for engine in engines]
        events = await drain(handle)
        for loop in loops:
            loop.cancel()
        return events, handle

    events, handle = asyncio.run(scenario())
    assert text_of(events) == "ab" and events[-1].reason is FinishReason.STOP and handle.request.num_resumes == 1


def test_moves_off_a_stopping_replica_happen_at_the_step_boundary_and_spend_no_retry():
    async def scenario():
        stopping = ScriptedReplica({7: SCRIPT})
        engines = make_engines(stopping, ScriptedReplica({7: SCRIPT}))
        handle = Router(engines, max_request_retries=0).submit(valid())
        loop = asyncio.create_task(engines[0].run())
        while len(handle.request.output_ids) < 3:
            await asyncio.sleep(0)
        stopping.announce_stopping()
        steps_at_notice = len(stopping.plans)
        await asyncio.wait_for(engines[0].failed.wait(), 5)
        other = asyncio.create_task(engines[1].run())
        events = await drain(handle)
        loop.cancel(), other.cancel()
        return events, handle, engines[0], len(stopping.plans) - steps_at_notice

    events, handle, stopped, steps_after_notice = asyncio.run(scenario())
    assert steps_after_notice <= 1  # at most the step in flight when the notice came
    assert stopped.preempted and not stopped.healthy
    assert tokens_of(events) == SCRIPT[:12] and handle.retries == 0 and handle.request.num_resumes == 1


def test_a_failure_spends_a_retry_and_the_last_one_ends_the_stream_unavailable_after_its_tokens():
    async def scenario():
        engines = make_engines(ScriptedReplica({7: SCRIPT}, fail_at_step=3), ScriptedReplica({7: SCRIPT}, fail_at_step=4))
        handle = Router(engines, max_request_retries=1).submit(valid())
        loops = [asyncio.create_task(engine.run()) for engine in engines]
        events = await drain(handle)
        for loop in loops:
            loop.cancel()
        return events

    events = asyncio.run(scenario())
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == grpc.StatusCode.UNAVAILABLE
    assert "failed 2 times" in events[-1].message
    assert tokens_of(events) == SCRIPT[:5]  # 2 tokens on replica 0, then 3 more on replica 1 (its 4th step failed)


def test_with_resume_on_restart_a_generation_waits_for_its_replica_to_come_back():
    async def scenario():
        engine = make_engines(ScriptedReplica({7: SCRIPT}, fail_at_step=4))[0]
        router = Router([engine], resume_on_restart=True)
        handle = router.submit(valid())
        loop = asyncio.create_task(engine.run())
        await asyncio.wait_for(engine.failed.wait(), 5)
        parked = router.num_parked
        engine.restore(ScriptedReplica({7: SCRIPT}), new_scheduler())
        events = await drain(handle)
        loop.cancel()
        return parked, events, handle

    parked, events, handle = asyncio.run(scenario())
    assert parked == 1 and tokens_of(events) == SCRIPT[:12] and handle.request.num_resumes == 1


def test_a_waiting_generation_ends_at_its_deadline_when_cancelled_or_when_every_replica_stays_down():
    async def scenario():
        engine = make_engines(ScriptedReplica({7: SCRIPT}))[0]
        router = Router([engine], resume_on_restart=True)
        late, cancelled, abandoned = (router.submit(valid()) for _ in range(3))
        late.request.deadline = time.monotonic() + 0.05
        engine.fail("test")
        router.cancel(cancelled)
        await asyncio.sleep(0.1)
        engine.abandon()
        return [await drain(handle) for handle in (late, cancelled, abandoned)], router.num_parked

    (late, cancelled, abandoned), parked = asyncio.run(scenario())
    assert late[-1].code == grpc.StatusCode.DEADLINE_EXCEEDED and "waiting for a replica to restart" in late[-1].message
    assert isinstance(cancelled[-1], FinishEvent) and cancelled[-1].reason is FinishReason.CANCELLED
    assert abandoned[-1].code == grpc.StatusCode.UNAVAILABLE and parked == 0


def test_without_resume_on_restart_a_generation_with_no_replica_left_ends_unavailable():
    async def scenario():
        engine = make_engines(ScriptedReplica({7: SCRIPT}))[0]
        router = Router([engine])
        handle = router.submit(valid())
        engine.fail("test", PREEMPTION)
        return await drain(handle), router.num_parked

    events, parked = asyncio.run(scenario())
    assert events[-1].code == grpc.StatusCode.UNAVAILABLE and parked == 0


def test_a_generation_held_for_its_slow_reader_moves_and_goes_on_once_the_reader_reads():
    async def scenario():
        engines = make_engines(ScriptedReplica({7: SCRIPT}), ScriptedReplica({7: SCRIPT}))
        handle = Router(engines).submit(valid(), stream=OutputStream(limit=2))
        first = asyncio.create_task(engines[0].run())
        while not handle.request.held:  # two tokens made, none written: held back
            await asyncio.sleep(0.01)
        engines[0].fail("test")
        second = asyncio.create_task(engines[1].run())
        events = []
        while not events or not isinstance(events[-1], (FinishEvent, ErrorEvent)):
            events.append(await asyncio.wait_for(handle.events.get(), 5))
            handle.delivered(1)  # the reader wrote it: the stream has room again
        first.cancel(), second.cancel()
        return events

    events = asyncio.run(scenario())
    assert tokens_of(events) == SCRIPT[:12] and isinstance(events[-1], FinishEvent)


class StoppingReplica(ScriptedReplica):
    """A driver that got SIGTERM refuses a step adding a sequence (ABORTED) before its notice arrives."""

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        if any(chunk.is_new for chunk in plan.chunks) and plan.step_id > 1:
            raise grpc.aio.AioRpcError(grpc.StatusCode.ABORTED, None, None, details="this driver is stopping (SIGTERM)")
        return await super().step(plan)


def test_a_step_refused_by_a_stopping_driver_hands_over_without_spending_retries():
    async def scenario():
        engines = make_engines(StoppingReplica({7: SCRIPT}), ScriptedReplica({7: SCRIPT}))
        router = Router(engines, max_request_retries=0)
        first = router.submit(valid())
        loop = asyncio.create_task(engines[0].run())
        while len(first.request.output_ids) < 2:
            await asyncio.sleep(0)
        engines[1].healthy = False  # the next request lands on replica 0 too, whose driver refuses it
        second = router.submit(valid())
        engines[1].healthy = True
        await asyncio.wait_for(engines[0].failed.wait(), 5)
        other = asyncio.create_task(engines[1].run())
        results = [await drain(first), await drain(second)]
        loop.cancel(), other.cancel()
        return results, engines[0].preempted

    (first, second), preempted = asyncio.run(scenario())
    assert preempted and tokens_of(first) == SCRIPT[:12] and tokens_of(second) == SCRIPT[:12]
