"""The engine loop against a scripted replica: finish reasons, cancellation, replica failure."""

import asyncio
import struct
import time

import grpc
import pytest
from fake_replica import EmbeddingReplica, ScriptedReplica

from shardgate.server.block_manager import BlockManager
from shardgate.server.config import EmbedBatcherConfig, SchedulerConfig
from shardgate.server.delivery import OutputStream
from shardgate.server.embed_batcher import DynamicBatcher, EmbedJob, Pooling
from shardgate.server.engine import Engine
from shardgate.server.output_processor import ErrorEvent, FinishEvent, TokenEvent
from shardgate.server.request import FinishReason, SamplingParams
from shardgate.server.scheduler import Scheduler
from shardgate.server.validation import ValidRequest
from shardgate.shards.builtin import builtin_tokenizer

EOS = 300


TOKENIZER = builtin_tokenizer()


def valid(first_token: int, max_new_tokens=8, ignore_eos=False, stop=()):
    params = SamplingParams(max_new_tokens, 0.0, 1.0, 0, 0, ignore_eos, False)
    return ValidRequest(f"r{first_token}", [first_token, 1, 2], params, list(stop))


async def drain(handle):
    events = []
    while not events or not isinstance(events[-1], (FinishEvent, ErrorEvent)):
        events.append(await asyncio.wait_for(handle.events.get(), 5))
    return events


def make_engine(replica, num_blocks=64):
    blocks = BlockManager(num_blocks, 4)
    return Engine(0, Scheduler(SchedulerConfig(), blocks), replica, TOKENIZER, (EOS,)), blocks


def text_of(events):
    return "".join(e.text for e in events if not isinstance(e, ErrorEvent))


@pytest.mark.parametrize(
    "request_args, script, reason, n_tokens, text",
    [
        (dict(max_new_tokens=5), "HI", FinishReason.LENGTH, 5, "HIHIH"),
        (dict(), ["H", "I", EOS], FinishReason.EOS, 3, "HI"),
        (dict(ignore_eos=True, max_new_tokens=4), ["H", EOS], FinishReason.LENGTH, 4, "HH"),
        (dict(stop=["IH"]), "HI", FinishReason.STOP, 3, "H"),
    ],
)
def test_finish_reasons(request_args, script, reason, n_tokens, text):
    async def scenario():
        ids = [t if t == EOS else TOKENIZER.token_to_id(t) for t in script]
        engine, blocks = make_engine(ScriptedReplica({10: ids}))
        loop = asyncio.create_task(engine.run())
        events = await drain(engine.submit(valid(10, **request_args)))
        loop.cancel()
        return events, blocks

    events, blocks = asyncio.run(scenario())
    assert isinstance(events[-1], FinishEvent) and events[-1].reason is reason
    assert sum(isinstance(e, TokenEvent) for e in events) == n_tokens
    assert text_of(events) == text and blocks.num_free == blocks.num_blocks


def test_cancel_frees_blocks_and_stops_computing():
    async def scenario():
        replica = ScriptedReplica({10: [72], 11: [73]})
        engine, blocks = make_engine(replica)
        loop = asyncio.create_task(engine.run())
        keep = engine.submit(valid(11, max_new_tokens=50))
        cancelled = engine.submit(valid(10, max_new_tokens=50))
        for _ in range(3):
            await cancelled.events.get()
        engine.cancel(cancelled)
        steps_at_cancel = len(replica.plans)
        events = await drain(keep)
        loop.cancel()
        return replica, cancelled, steps_at_cancel, events, blocks

    replica, cancelled, at_cancel, events, blocks = asyncio.run(scenario())
    assert cancelled.request.finish_reason is FinishReason.CANCELLED
    later = replica.plans[at_cancel + 1 :]
    assert later and all(c.request is not cancelled.request for p in later for c in p.chunks)
    assert cancelled.request.seq_id in replica.plans[at_cancel].free_seq_ids + [s for p in later for s in p.free_seq_ids]
    assert isinstance(events[-1], FinishEvent) and blocks.num_free == blocks.num_blocks


def test_replica_failure_ends_requests_with_unavailable():
    async def scenario():
        engine, blocks = make_engine(ScriptedReplica({10: [72]}, fail_at_step=3))
        loop = asyncio.create_task(engine.run())
        events = await drain(engine.submit(valid(10, max_new_tokens=50)))
        loop.cancel()
        return events, blocks, engine

    events, blocks, engine = asyncio.run(scenario())
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == grpc.StatusCode.UNAVAILABLE
    assert blocks.num_free == blocks.num_blocks and engine.num_active == 0


def test_deadline_passed_in_the_queue_never_reaches_the_replica():
    async def scenario():
        replica = ScriptedReplica({10: [72], 11: [73]})
        engine, blocks = make_engine(replica)
        loop = asyncio.create_task(engine.run())
        late = engine.submit(valid(10, max_new_tokens=5), deadline=time.monotonic() - 0.001)
        on_time = engine.submit(valid(11, max_new_tokens=5), deadline=time.monotonic() + 60)
        late_events, on_time_events = await drain(late), await drain(on_time)
        loop.cancel()
        return replica, late, late_events, on_time_events, blocks, engine

    replica, late, late_events, on_time_events, blocks, engine = asyncio.run(scenario())
    assert late_events == [ErrorEvent(grpc.StatusCode.DEADLINE_EXCEEDED, late_events[0].message)]
    assert "while queued" in late_events[0].message
    assert all(c.request is not late.request for p in replica.plans for c in p.chunks)
    assert isinstance(on_time_events[-1], FinishEvent) and engine.scheduler.num_started == 1
    assert blocks.num_free == blocks.num_blocks


def test_deadline_mid_decode_keeps_the_tokens_and_frees_the_blocks():
    async def scenario():
        replica = ScriptedReplica({10: [72]})
        engine, blocks = make_engine(replica)
        loop = asyncio.create_task(engine.run())
        handle = engine.submit(valid(10, max_new_tokens=50), deadline=time.monotonic() + 60)
        events = [await handle.events.get() for _ in range(3)]
        handle.request.deadline = time.monotonic()  # the deadline arrives now
        steps_at_deadline = len(replica.plans)
        events += await drain(handle)
        loop.cancel()
        return replica, handle, events, steps_at_deadline, blocks

    replica, handle, events, at_deadline, blocks = asyncio.run(scenario())
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert events[-1].message == f"deadline exceeded after {len(tokens)} generated tokens"
    assert len(tokens) <= sum(p.num_steps for p in replica.plans[: at_deadline + 1])  # at most the plan in flight when it expired
    assert all(c.request is not handle.request for p in replica.plans[at_deadline + 1 :] for c in p.chunks)
    assert blocks.num_free == blocks.num_blocks


class CancellingReplica(ScriptedReplica):
    """Cancels a request from inside the step in which `when(plan, request)` first holds."""

    def __init__(self, scripts, when):
        super().__init__(scripts)
        self.when = when
        self.target = None
        self.engine = None
        self.cancelled_at = None

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        if self.cancelled_at is None and self.target is not None and self.when(plan, self.target.request):
            self.engine.cancel(self.target)
            self.cancelled_at = len(self.plans)
        return await super().step(plan)


def _chunk_of(plan, request):
    return next((c for c in plan.chunks if c.request is request), None)


@pytest.mark.parametrize(
    "state, when",
    [
        ("queued", lambda plan, request: request.first_scheduled is None and plan.step_id >= 2),
        ("prefill", lambda plan, request: (c := _chunk_of(plan, request)) is not None and not c.sample),
        ("decode", lambda plan, request: (c := _chunk_of(plan, request)) is not None and c.num_tokens == 1 and c.start_pos > 30),
    ],
)
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_cancel_in_any_state_frees_everything_within_one_step(state, when, async_scheduling):
    async def scenario():
        replica = CancellingReplica({10: [72], 11: [73]}, when)
        blocks = BlockManager(64, 4)
        config = SchedulerConfig(
            max_batch_tokens=8, max_num_seqs=1 if state == "queued" else 4, decode_steps=1, async_scheduling=async_scheduling
        )
        engine = Engine(
            0,
            Scheduler(config, blocks),
            replica,
            TOKENIZER,
            (EOS,),
        )
        replica.engine = engine
        loop = asyncio.create_task(engine.run())
        other = engine.submit(valid(11, max_new_tokens=12))
        prompt = [10] + [1] * 29  # 30 tokens: a prefill of four steps at 8 tokens a step
        target = engine.submit(ValidRequest("target", prompt, valid(10, max_new_tokens=40).params, []))
        replica.target = target
        events = await drain(target)
        await drain(other)
        loop.cancel()
        return replica, target, events, blocks, engine

    replica, target, events, blocks, engine = asyncio.run(scenario())
    assert replica.cancelled_at is not None and events[-1] == FinishEvent(FinishReason.CANCELLED, events[-1].text)
    # Nothing computed for it after the step in which it was cancelled (with async scheduling, after
    # the step that may have been planned while that one ran).
    later = replica.plans[replica.cancelled_at + 1 :]
    assert all(c.request is not target.request for p in later[async_scheduling:] for c in p.chunks)
    if target.request.first_scheduled is not None:
        assert target.request.seq_id in [s for p in later for s in p.free_seq_ids]  # the replica forgets it
    assert blocks.num_free == blocks.num_blocks and engine.num_active == 0
    status = engine.scheduler.status()
    assert status.waiting == 0 and status.running == 0


def embed_job(*inputs, deadline=None):
    return EmbedJob("e", [list(tokens) for tokens in inputs], Pooling.MEAN, False, deadline=deadline)


def make_embed_engine(replica, num_blocks=64, max_batch_tokens=64, delay_us=0, max_batch_size=32):
    blocks = BlockManager(num_blocks, 4)
    batcher = DynamicBatcher(EmbedBatcherConfig(max_batch_size=max_batch_size, max_queue_delay_us=delay_us, max_inputs=4), aging_s=1.0)
    engine = Engine(
        0, Scheduler(SchedulerConfig(max_batch_tokens=max_batch_tokens, decode_steps=1), blocks), replica, TOKENIZER, (EOS,), batcher
    )
    return engine, batcher, blocks


def vectors_of(job):
    return [struct.unpack("<2f", v) for v in job.vectors]


def test_embedding_calls_share_a_forward_in_lent_blocks():
    async def scenario():
        replica = EmbeddingReplica()
        engine, batcher, blocks = make_embed_engine(replica, delay_us=20_000)
        loop = asyncio.create_task(engine.run())
        jobs = [embed_job([1] * (i + 1), [2, 2]) for i in range(5)]
        for job in jobs:
            batcher.submit(job)
        await asyncio.gather(*(job.finished.wait() for job in jobs))
        loop.cancel()
        return replica, jobs, blocks, engine

    replica, jobs, blocks, engine = asyncio.run(scenario())
    assert [kind for kind, *_ in replica.batches] == ["embed"]  # five calls, one forward
    _, tokens, tables = replica.batches[0]
    assert len(tokens) == 10 and all(len(t) == -(-len(x) // 4) for t, x in zip(tables, tokens))
    assert len({b for t in tables for b in t}) == sum(len(t) for t in tables)  # no block lent twice
    assert [vectors_of(job) for job in jobs] == [[(i + 1, i + 1), (2, 4)] for i in range(5)]
    assert blocks.num_free == blocks.num_blocks and engine.num_embed_forward_passes == engine.num_forward_passes == 1


def test_embedding_batch_larger_than_the_token_budget_takes_several_forwards():
    async def scenario():
        replica = EmbeddingReplica()
        engine, batcher, blocks = make_embed_engine(replica, max_batch_tokens=8)
        loop = asyncio.create_task(engine.run())
        job = embed_job([1, 1, 1], [2, 2, 2], [3, 3, 3], [4])
        batcher.submit(job)
        await job.finished.wait()
        loop.cancel()
        return replica, job, blocks

    replica, job, blocks = asyncio.run(scenario())
    assert [tokens for _, tokens, _ in replica.batches] == [[[1, 1, 1], [2, 2, 2]], [[3, 3, 3], [4]]]
    assert vectors_of(job) == [(3, 3), (3, 6), (3, 9), (1, 4)] and blocks.num_free == blocks.num_blocks


def test_embedding_and_generation_alternate_and_embedding_preempts_for_blocks():
    async def scenario():
        replica = EmbeddingReplica({10: [72]})
        engine, batcher, blocks = make_embed_engine(replica, num_blocks=6, max_batch_tokens=8)  # one input a forward
        loop = asyncio.create_task(engine.run())
        handle = engine.submit(valid(10, max_new_tokens=20))  # grows to 6 blocks: the whole cache
        events = [await handle.events.get() for _ in range(18)]  # 21+ tokens: 6 blocks, or 5 and one free
        jobs = [embed_job([5] * 8), embed_job([6] * 8)]
        for job in jobs:
            batcher.submit(job)
        await asyncio.gather(*(job.finished.wait() for job in jobs))
        events += await drain(handle)
        loop.cancel()
        return replica, handle, events, jobs, blocks, engine

    replica, handle, events, jobs, blocks, engine = asyncio.run(scenario())
    kinds = [kind for kind, *_ in replica.batches]
    first_embed = kinds.index("embed")
    assert kinds[first_embed : first_embed + 3] == ["embed", "step", "embed"]  # generation waits: they alternate
    assert engine.scheduler.num_preemptions >= 1 and handle.request.num_preemptions >= 1
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == [72] * 20  # recomputed, unchanged
    assert [vectors_of(job) for job in jobs] == [[(8, 40)], [(8, 48)]] and blocks.num_free == blocks.num_blocks


def test_embedding_call_past_its_deadline_is_never_computed():
    async def scenario():
        replica = EmbeddingReplica()
        engine, batcher, _ = make_embed_engine(replica)
        loop = asyncio.create_task(engine.run())
        late = embed_job([1], deadline=time.monotonic() - 1)
        batcher.submit(late)
        await late.finished.wait()
        loop.cancel()
        return replica, late

    replica, late = asyncio.run(scenario())
    assert late.error[0] == grpc.StatusCode.DEADLINE_EXCEEDED and replica.batches == []


def test_embedding_call_cancelled_during_its_forward_gets_nothing():
    class CancelDuringForward(EmbeddingReplica):
        async def embed(self, step_id, items, timeout=None):
            self.batcher.cancel(self.victim)  # the caller goes away while the forward runs
            return await super().embed(step_id, items)

    async def scenario():
        replica = CancelDuringForward()
        engine, batcher, blocks = make_embed_engine(replica)
        jobs = [embed_job([1, 2]), embed_job([3])]
        replica.batcher, replica.victim = batcher, jobs[0]
        loop = asyncio.create_task(engine.run())
        for job in jobs:
            batcher.submit(job)
        await asyncio.gather(*(job.finished.wait() for job in jobs))
        loop.cancel()
        return jobs, blocks

    jobs, blocks = asyncio.run(scenario())
    assert jobs[0].error[0] == grpc.StatusCode.CANCELLED and jobs[0].vectors == [None]
    assert vectors_of(jobs[1]) == [(1, 3)] and blocks.num_free == blocks.num_blocks


def test_steps_are_traced_for_sampled_requests_and_charged_to_them():
    from opentelemetry.trace import SpanContext, TraceFlags
    from span_capture import capture_spans

    from shardgate.server.config import TelemetryConfig
    from shardgate.server.telemetry import Telemetry

    provider, exporter = capture_spans()
    telemetry = Telemetry(TelemetryConfig(), provider)

    async def scenario():
        replica = ScriptedReplica({10: [72], 11: [73]})
        engine = Engine(
            0,
            Scheduler(SchedulerConfig(decode_steps=1), BlockManager(64, 4)),
            replica,
            TOKENIZER,
            (EOS,),
            telemetry=telemetry.replica(0, 2),
        )
        loop = asyncio.create_task(engine.run())
        traced = engine.submit(valid(10, max_new_tokens=3))
        traced.request.span_context = SpanContext(5, 6, False, TraceFlags(TraceFlags.SAMPLED))
        await drain(traced)
        untraced = engine.submit(valid(11, max_new_tokens=2))
        await drain(untraced)
        loop.cancel()
        return replica, traced, untraced

    replica, traced, untraced = asyncio.run(scenario())
    steps = exporter.get_finished_spans()
    assert len(steps) == 3 and all([(link.context.trace_id, link.context.span_id) for link in s.links] == [(5, 6)] for s in steps)
    assert [dict(m).get("traceparent", "")[3:35] for m in replica.metadata] == [f"{s.context.trace_id:032x}" for s in steps] + ["", ""]
    charged = traced.request.device_seconds + untraced.request.device_seconds
    assert traced.request.device_seconds > 0 and untraced.request.device_seconds > 0
    busy = telemetry.metrics.registry.get_sample_value("shardgate_device_seconds_total", {"model": "", "replica": "0"})
    assert charged == pytest.approx(busy)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_that_ends_inside_a_decode_run_drops_the_rest_of_the_run(async_scheduling):
    async def scenario():
        replica = ScriptedReplica({10: [72, 72, 72, EOS, 72, 72, 72, 72]})
        blocks = BlockManager(64, 4)
        config = SchedulerConfig(decode_steps=4, async_scheduling=async_scheduling)  # decode runs of up to 4 steps
        engine = Engine(0, Scheduler(config, blocks), replica, TOKENIZER, (EOS,))
        loop = asyncio.create_task(engine.run())
        events = await drain(engine.submit(valid(10, max_new_tokens=20)))
        loop.cancel()
        return replica, events, blocks

    replica, events, blocks = asyncio.run(scenario())
    # The prefill, then one run of four (with async scheduling, the next run was sent before the EOS came back).
    assert [plan.num_steps for plan in replica.plans] == [1, 4, 4] if async_scheduling else [1, 4]
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == [72, 72, 72, EOS]  # not the run's last token
    assert events[-1] == FinishEvent(FinishReason.EOS, events[-1].text) and blocks.num_free == blocks.num_blocks


def test_a_request_over_its_streams_bound_waits_then_resumes_as_its_output_is_delivered():
    async def scenario():
        replica = ScriptedReplica({10: [72]})
        engine, blocks = make_engine(replica)
        loop = asyncio.create_task(engine.run())
        stream = OutputStream(limit=6)
        handle = engine.submit(valid(10, max_new_tokens=20), stream=stream)
        await asyncio.sleep(0.2)
        held_at = len(handle.request.output_ids)
        events = []
        while not events or not isinstance(events[-1], FinishEvent):
            events.append(await asyncio.wait_for(handle.events.get(), 5))
            handle.delivered(1)  # what a frontend does once its transport took the output
        loop.cancel()
        return held_at, handle, events, blocks

    held_at, handle, events, blocks = asyncio.run(scenario())
    # A prefill, then decode runs up to the bound; the two in flight when it was passed (async scheduling) still come.
    assert 6 <= held_at < 6 + 2 * SchedulerConfig().decode_steps + 1
    assert handle.request.finish_reason is FinishReason.LENGTH and len(handle.request.output_ids) == 20
    assert isinstance(events[-1], FinishEvent) and blocks.num_free == blocks.num_blocks


def test_a_request_held_past_the_stall_timeout_ends_deadline_exceeded_and_frees_its_blocks():
    async def scenario():
        replica = ScriptedReplica({10: [72], 11: [73]})
        blocks = BlockManager(64, 4)
        engine = Engine(0, Scheduler(SchedulerConfig(), blocks), replica, TOKENIZER, (EOS,), stall_timeout_s=0.3)
        loop = asyncio.create_task(engine.run())
        stalled = engine.submit(valid(10, max_new_tokens=50), stream=OutputStream(limit=4))
        ended = []
        stalled.on_stall_end = lambda: ended.append(time.monotonic())
        other = await drain(engine.submit(valid(11, max_new_tokens=30)))  # served meanwhile
        started = time.monotonic()
        while not ended:
            await asyncio.sleep(0.02)
        events = [stalled.events.get_nowait() for _ in range(stalled.events.qsize())]
        loop.cancel()
        return stalled, events, other, blocks, ended[0] - started

    stalled, events, other, blocks, _ = asyncio.run(scenario())
    assert isinstance(other[-1], FinishEvent)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--stream-stall-timeout" in events[-1].message and "KV cache was freed" in events[-1].message
    assert 4 <= sum(isinstance(e, TokenEvent) for e in events) < 50
    assert blocks.num_free == blocks.num_blocks
