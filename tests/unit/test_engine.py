"""The engine loop against a scripted replica: finish reasons, cancellation, replica failure."""

import asyncio

import grpc
import pytest

from shardgate.proto import shard_pb2
from shardgate.server.block_manager import BlockManager
from shardgate.server.config import SchedulerConfig
from shardgate.server.engine import Engine, ErrorEvent, FinishEvent, TokenEvent
from shardgate.server.request import FinishReason, SamplingParams
from shardgate.server.scheduler import Scheduler
from shardgate.server.validation import ValidRequest
from shardgate.shards.builtin import builtin_tokenizer

EOS = 300


TOKENIZER = builtin_tokenizer()


class ScriptedReplica:
    """Answers each step with the next token of each sequence's script (by request prompt)."""

    def __init__(self, scripts: dict[int, list[int]], fail_at_step: int | None = None) -> None:
        self.scripts = scripts
        self.fail_at_step = fail_at_step
        self.plans = []
        self.metadata = []

    async def step(self, plan, metadata=(), report_timings=False):
        self.plans.append(plan)
        self.metadata.append(metadata)
        await asyncio.sleep(0)
        if plan.step_id == self.fail_at_step:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, details="shard died")
        tokens = []
        for chunk in plan.chunks:
            if chunk.sample:
                script = self.scripts[chunk.request.prompt_ids[0]]
                tokens.append(shard_pb2.SampledToken(seq_id=chunk.request.seq_id, token_id=script[len(chunk.request.output_ids) % len(script)]))
        return shard_pb2.StepResponse(tokens=tokens)


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


def test_steps_are_traced_for_sampled_requests_and_charged_to_them():
    from opentelemetry.trace import SpanContext, TraceFlags

    from shardgate.server.config import TelemetryConfig
    from shardgate.server.telemetry import Telemetry
    from span_capture import capture_spans

    provider, exporter = capture_spans()
    telemetry = Telemetry(TelemetryConfig(), provider)

    async def scenario():
        replica = ScriptedReplica({10: [72], 11: [73]})
        engine = Engine(0, Scheduler(SchedulerConfig(), BlockManager(64, 4)), replica, TOKENIZER, (EOS,), telemetry.replica(0, 2))
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
    busy = telemetry.metrics.registry.get_sample_value("shardgate_device_seconds_total", {"replica": "0"})
    assert charged == pytest.approx(busy)
