"""The engine's step pipeline (async scheduling) against a fake replica that runs steps one at a
time, in the order the driver would (after_step_id), and feeds each decode of a token in flight
the token its sequence sampled, as the driver's sequence table does."""

import asyncio
import time

import pytest

from shardgate.proto import shard_pb2
from shardgate.server.block_manager import BlockManager
from shardgate.server.config import EmbedBatcherConfig, SchedulerConfig, SupervisionConfig
from shardgate.server.embed_batcher import DynamicBatcher, EmbedJob, Pooling
from shardgate.server.engine import Engine
from shardgate.server.output_processor import ErrorEvent, FinishEvent, TokenEvent
from shardgate.server.replicas.client import plan_to_proto
from shardgate.server.request import FinishReason, SamplingParams
from shardgate.server.scheduler import Scheduler
from shardgate.server.validation import ValidRequest
from shardgate.shards.builtin import builtin_tokenizer
from shardgate.shards.sequences import SequenceTable

TOKENIZER = builtin_tokenizer()
EOS = 300
A, B = TOKENIZER.token_to_id("A"), TOKENIZER.token_to_id("B")


class PipelinedReplica:
    """Answers each sequence with its script (by its prompt's first token) at the draw's output
    index; runs one step at a time in the order sent, checks that each decode of a token in flight
    gets the token its sequence sampled, and records how many steps were in flight at once."""

    def __init__(self, scripts: dict[int, list[int]], step_s: float = 0.002, hang_at_step: int | None = None) -> None:
        self.scripts = scripts
        self.step_s = step_s
        self.hang_at_step = hang_at_step
        self.sequences = SequenceTable()
        self.scripts_of: dict[int, list[int]] = {}
        self.plans = []
        self.calls = []  # ("step", step_id) or ("embed", step_id) in the order sent

    def watch_stopping(self, callback) -> None:
        """Its driver never stops."""
        self.in_flight = self.most_in_flight = 0
        self._turn = asyncio.Lock()

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        message = plan_to_proto(plan)
        # A step sent while another runs names the one sent before it (which may also have answered
        # already, unapplied); one sent alone, none.
        last = self.calls[-1][1] if self.calls else 0
        assert message.after_step_id == last if self.in_flight else message.after_step_id in (0, last)
        self.plans.append(plan)
        self.calls.append(("step", message.step_id))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            async with self._turn:  # one step at a time, in the order sent
                await asyncio.sleep(self.step_s)
                if message.step_id == self.hang_at_step:
                    await asyncio.sleep(3600)
                return self._run(message)
        finally:
            self.in_flight -= 1

    def _run(self, message: shard_pb2.StepRequest) -> shard_pb2.StepResponse:
        fed = {c.seq_id: c.output_index for c in message.chunks if c.last_sampled_input}
        self.sequences.fill_sampled_inputs(message)
        for chunk in message.chunks:
            if chunk.HasField("sampling"):
                self.scripts_of[chunk.seq_id] = self.scripts[chunk.token_ids[0]]
            if chunk.seq_id in fed:  # the fed token is the one this sequence drew last
                assert list(chunk.token_ids) == [self._script_token(chunk.seq_id, fed[chunk.seq_id] - 1)]
        self.sequences.apply(message)
        tokens = [
            shard_pb2.SampledToken(seq_id=c.seq_id, token_id=self._script_token(c.seq_id, c.output_index + step))
            for step in range(max(message.num_steps, 1))
            for c in message.chunks
            if c.sample
        ]
        last = tokens[len(tokens) - sum(c.sample for c in message.chunks) :]
        self.sequences.record_sampled(message, [t.token_id for t in last])
        return shard_pb2.StepResponse(tokens=tokens)

    def _script_token(self, seq_id: int, index: int) -> int:
        script = self.scripts_of[seq_id]
        return script[index % len(script)]

    async def embed(self, step_id, items, timeout=None):
        assert self.in_flight == 0, "an embedding batch ran while a step was in flight"
        self.calls.append(("embed", step_id))
        await asyncio.sleep(0)
        return shard_pb2.EmbedStepResponse(vectors=b"\0" * 8 * len(items), hidden_size=2)


def valid(first_token: int, max_new_tokens=8, ignore_eos=False, stop=(), request_id=None):
    params = SamplingParams(max_new_tokens, 0.0, 1.0, 0, 0, ignore_eos, False)
    return ValidRequest(request_id or f"r{first_token}", [first_token, 1, 2], params, list(stop))


def make_engine(replica, async_scheduling=True, decode_steps=1, num_blocks=64, **engine_args):
    blocks = BlockManager(num_blocks, 4)
    config = SchedulerConfig(decode_steps=decode_steps, async_scheduling=async_scheduling)
    return Engine(0, Scheduler(config, blocks), replica, TOKENIZER, (EOS,), **engine_args), blocks


async def drain(handle):
    events = []
    while not events or not isinstance(events[-1], (FinishEvent, ErrorEvent)):
        events.append(await asyncio.wait_for(handle.events.get(), 5))
    return events


SCRIPTS = {10: [A, B, A, EOS, B], 11: [B, B, A], 12: [A, A, B, B, B, B, B, EOS], 13: [B, A]}
REQUESTS = [
    dict(first_token=10),  # EOS at its fourth token
    dict(first_token=11, max_new_tokens=5),  # length
    dict(first_token=12, stop=["BBBB"]),  # a stop string ending at its sixth token
    dict(first_token=13, max_new_tokens=9, ignore_eos=True),
]


def run_requests(async_scheduling: bool, decode_steps: int):
    async def scenario():
        replica = PipelinedReplica(SCRIPTS)
        engine, blocks = make_engine(replica, async_scheduling, decode_steps)
        loop = asyncio.create_task(engine.run())
        handles = [engine.submit(valid(**args)) for args in REQUESTS]
        events = [await drain(handle) for handle in handles]
        loop.cancel()
        return replica, events, [h.request.output_ids for h in handles], blocks, engine

    return asyncio.run(scenario())


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_async_scheduling_gives_the_same_tokens_and_finishes_with_two_steps_in_flight(decode_steps):
    sync_replica, sync_events, sync_outputs, _, _ = run_requests(False, decode_steps)
    replica, events, outputs, blocks, engine = run_requests(True, decode_steps)
    assert sync_replica.most_in_flight == 1 and replica.most_in_flight == 2
    assert events == sync_events and outputs == sync_outputs
    reasons = [e[-1].reason for e in events]
    assert reasons == [FinishReason.EOS, FinishReason.LENGTH, FinishReason.STOP, FinishReason.LENGTH]
    assert [len(tokens) for tokens in outputs] == [4, 5, 6, 9]  # no token past the end
    assert blocks.num_free == blocks.num_blocks and engine.num_active == 0
    assert engine.scheduler.status().running == 0 and not engine._in_flight


def test_a_request_that_ends_mid_pipeline_is_freed_on_the_replica_after_its_last_step():
    replica, _, _, _, _ = run_requests(True, 1)
    for seq_id in (1, 2, 3):  # the fourth ends last: no plan comes after it
        last = max(i for i, plan in enumerate(replica.plans) if any(c.request.seq_id == seq_id for c in plan.chunks))
        freed = [i for i, plan in enumerate(replica.plans) if seq_id in plan.free_seq_ids]
        assert len(freed) == 1 and freed[0] > last  # forgotten once, in a later plan: never while a step of it may run


def test_a_failure_with_two_steps_in_flight_moves_the_request_with_only_the_applied_tokens():
    async def scenario():
        replica = PipelinedReplica({10: [A]}, hang_at_step=5)
        supervision = SupervisionConfig(step_timeout_s=0.3, step_timeout_floor_s=0.3, heartbeat_interval_s=0)
        engine, blocks = make_engine(replica, supervision=supervision)
        moved = asyncio.Event()
        orphans = []
        engine.on_orphans = lambda handles, cause: (orphans.extend(handles), moved.set())
        loop = asyncio.create_task(engine.run())
        handle = engine.submit(valid(10, max_new_tokens=50))
        started = time.monotonic()
        await asyncio.wait_for(moved.wait(), 5)
        waited = time.monotonic() - started
        loop.cancel()
        events = []
        while not handle.events.empty():
            events.append(handle.events.get_nowait())
        return events, orphans, handle, blocks, engine, waited

    events, orphans, handle, blocks, engine, waited = asyncio.run(scenario())
    assert orphans == [handle]  # it moves on (the router re-queues it elsewhere), no terminal event here
    assert [type(e) for e in events] == [TokenEvent] * 4  # steps 1-4 answered; 5 hung, 6 waited behind it
    assert handle.request.output_ids == [A] * 4 and handle.request.num_in_flight_tokens == 0
    assert not engine._in_flight and not engine.healthy
    assert blocks.num_free == blocks.num_blocks and waited < 2  # the hung step's deadline counts from step 4's answer


def test_an_embedding_batch_waits_until_no_step_is_in_flight():
    async def scenario():
        replica = PipelinedReplica({10: [A]})
        batcher = DynamicBatcher(EmbedBatcherConfig(max_queue_delay_us=0), aging_s=1.0)
        engine, blocks = make_engine(replica, batcher=batcher)
        loop = asyncio.create_task(engine.run())
        handle = engine.submit(valid(10, max_new_tokens=30, ignore_eos=True))
        while len(handle.request.output_ids) < 3:
            await asyncio.sleep(0.001)
        job = EmbedJob("e", [[1, 2, 3]], Pooling.MEAN, False)
        batcher.submit(job)
        await asyncio.wait_for(job.finished.wait(), 5)
        events = await drain(handle)
        loop.cancel()
        return replica, events, blocks

    replica, events, blocks = asyncio.run(scenario())
    assert ("embed", 1) in replica.calls and isinstance(events[-1], FinishEvent)
    assert len([e for e in events if isinstance(e, TokenEvent)]) == 30 and blocks.num_free == blocks.num_blocks
