"""The driver's step: its span and the ranks' forward spans, and the timings it reports."""

import pytest
import torch
from opentelemetry.trace import SpanKind, StatusCode
from span_capture import capture_spans

from shardgate.proto import shard_pb2
from shardgate.proto.tracing import context_from_traceparent
from shardgate.shards.executor import StepExecutor
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.memory import RankMemory
from shardgate.shards.runner import ModelRunner
from shardgate.shards.weights import load_model

CPU = torch.device("cpu")
CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def runner():
    loaded = load_model("builtin:tiny", torch.float32, CPU)
    return ModelRunner(loaded.model, loaded.config, KVCache(loaded.model.kv_layout, 16, 4, torch.float32, CPU), CPU)


def executor_and_spans(runner):
    provider, exporter = capture_spans()
    executor = StepExecutor(runner, runner.parallel, provider.get_tracer("test"))
    return executor, exporter


def plan(seq_id: int = 1, report_timings: bool = False) -> shard_pb2.StepRequest:
    chunk = shard_pb2.SeqChunk(
        seq_id=seq_id, token_ids=[5, 6, 7], start_pos=0, new_block_ids=[0], sample=True, sampling=shard_pb2.Sampling(temperature=0, top_p=1)
    )
    return shard_pb2.StepRequest(step_id=3, free_seq_ids=[seq_id], chunks=[chunk], report_timings=report_timings)


def test_a_traced_step_has_a_driver_span_over_each_ranks_forward(runner):
    executor, exporter = executor_and_spans(runner)
    response = executor.run(plan(), parent=context_from_traceparent(CALLER))
    driver, forward = sorted(exporter.get_finished_spans(), key=lambda s: s.name != "shardgate.shard.v1.Shard/Step")
    assert driver.kind is SpanKind.SERVER and f"{driver.parent.span_id:016x}" == CALLER.split("-")[2]
    assert driver.context.trace_id == forward.context.trace_id == int(CALLER.split("-")[1], 16)
    assert forward.name == "forward" and forward.parent.span_id == driver.context.span_id
    assert driver.start_time <= forward.start_time <= forward.end_time <= driver.end_time
    assert (driver.attributes["rpc.system"], driver.attributes["rpc.service"], driver.attributes["rpc.method"]) == (
        "grpc",
        "shardgate.shard.v1.Shard",
        "Step",
    )
    attributes = forward.attributes
    ranks = ("shardgate.shard.rank", "shardgate.shard.tp_rank", "shardgate.shard.pp_stage", "shardgate.shard.tokens")
    assert tuple(attributes[name] for name in ranks) == (0, 0, 0, 3)
    assert attributes["shardgate.shard.all_reduce.count"] == 0  # one rank: no collectives
    [timing] = response.rank_timings  # a traced step waits for every rank's timings
    assert timing.rank == 0 and 0 < timing.forward_s <= (driver.end_time - driver.start_time) / 1e9
    assert forward.end_time - forward.start_time == pytest.approx(timing.forward_s * 1e9, abs=1000)


@pytest.mark.parametrize("report_timings", [False, True])
def test_an_untraced_step_makes_no_spans(runner, report_timings):
    executor, exporter = executor_and_spans(runner)
    request = plan(report_timings=report_timings)
    request.traceparent = CALLER  # the gateway never sets it; the driver overwrites it
    response = executor.run(request)
    assert exporter.get_finished_spans() == () and request.traceparent == ""
    assert len(response.rank_timings) == report_timings and len(response.tokens) == 1


def test_a_rejected_plan_ends_the_driver_span_with_an_error(runner):
    executor, exporter = executor_and_spans(runner)
    bad = plan()
    bad.chunks[0].ClearField("sampling")  # a sequence the replica does not know
    with pytest.raises(ValueError, match="unknown sequence"):
        executor.run(bad, parent=context_from_traceparent(CALLER))
    [driver] = exporter.get_finished_spans()
    assert driver.status.status_code is StatusCode.ERROR


def _decode_plan(step_id: int, seq_ids: list[int], tokens: list[int], start_pos: int, blocks: dict[int, list[int]], num_steps: int = 1):
    chunks = [
        shard_pb2.SeqChunk(
            seq_id=s, token_ids=[t], start_pos=start_pos, new_block_ids=blocks.pop(s, []), sample=True, output_index=start_pos - 2
        )
        for s, t in zip(seq_ids, tokens)
    ]
    return shard_pb2.StepRequest(step_id=step_id, chunks=chunks, num_steps=num_steps)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_multi_step_plan_gives_the_tokens_of_as_many_single_steps(runner, temperature):
    """Each step of a run feeds every sequence the token it sampled before: the tokens (and
    seeded draws, and logprobs) are those of the same decodes sent one step at a time."""
    sampling = shard_pb2.Sampling(temperature=temperature, top_p=1, seed=11, logprobs=True)

    def prefill(executor, first_block):
        chunks = [
            shard_pb2.SeqChunk(
                seq_id=s, token_ids=[5 + s, 6, 7], start_pos=0, new_block_ids=[first_block + 2 * s], sample=True, sampling=sampling
            )
            for s in (0, 1)
        ]
        response = executor.run(shard_pb2.StepRequest(step_id=1, chunks=chunks))
        return [t.token_id for t in response.tokens]

    single = StepExecutor(runner, runner.parallel)
    tokens = prefill(single, 0)
    singles = []
    for step in range(5):
        blocks = {0: [1], 1: [3]} if step == 0 else {}
        response = single.run(_decode_plan(2 + step, [0, 1], tokens, 3 + step, blocks))
        tokens = [t.token_id for t in response.tokens]
        singles.extend((t.seq_id, t.token_id, t.logprob) for t in response.tokens)

    multi = StepExecutor(runner, runner.parallel)
    tokens = prefill(multi, 4)
    response = multi.run(_decode_plan(2, [0, 1], tokens, 3, {0: [5], 1: [7]}, num_steps=5))
    assert [(t.seq_id, t.token_id) for t in response.tokens] == [(s, t) for s, t, _ in singles]  # step-major
    assert [t.logprob for t in response.tokens] == pytest.approx([lp for _, _, lp in singles], abs=1e-5)


def test_timings_carry_the_ranks_memory(runner):
    memory = RankMemory(runner.model, runner.kv_cache.nbytes, 12345, CPU)
    executor = StepExecutor(runner, runner.parallel, memory=memory)
    [timing] = executor.run(plan(report_timings=True)).rank_timings
    assert timing.weights_bytes == sum(p.nbytes for p in runner.model.parameters()) + sum(b.nbytes for b in runner.model.buffers())
    assert timing.kv_cache_bytes == runner.kv_cache.nbytes > 0
    assert timing.activation_peak_bytes == 12345  # on CPU: the profiled step's peak
    assert 0 < timing.device_memory_free_bytes < timing.device_memory_total_bytes  # the host's
