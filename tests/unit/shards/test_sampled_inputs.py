"""Async scheduling on the replica: a decode whose input is the token its sequence sampled last
(SeqChunk.last_sampled_input) gets that token from the driver, the plan check refuses one with no
such token, and pipelined Step calls reach the main thread in the order the gateway sent them."""

import threading
import time

import pytest
import torch

from shardgate.proto import shard_pb2
from shardgate.proto.shard_config import BatchLimits
from shardgate.shards.driver import StepOrder
from shardgate.shards.executor import StepExecutor
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.plan_check import PlanError, PlanLimits, check_step
from shardgate.shards.runner import ModelRunner
from shardgate.shards.weights import load_model

CPU = torch.device("cpu")
SAMPLING = shard_pb2.Sampling(temperature=0.8, top_p=1, seed=7, logprobs=True)


@pytest.fixture(scope="module")
def runner():
    loaded = load_model("builtin:tiny", torch.float32, CPU)
    return ModelRunner(loaded.model, loaded.config, KVCache(loaded.model.kv_layout, 16, 4, torch.float32, CPU), CPU)


def prefill(step_id: int, first_block: int) -> shard_pb2.StepRequest:
    chunks = [
        shard_pb2.SeqChunk(seq_id=s, token_ids=[5 + s, 6, 7], new_block_ids=[first_block + 2 * s], sample=True, sampling=SAMPLING)
        for s in (0, 1)
    ]
    return shard_pb2.StepRequest(step_id=step_id, chunks=chunks)


def decode(step_id: int, start_pos: int, tokens: dict[int, int] | None, blocks: dict[int, list[int]], num_steps: int = 1):
    """Both sequences' decodes at start_pos: of the given tokens, or (None) of those they sampled last."""
    chunks = [
        shard_pb2.SeqChunk(
            seq_id=s,
            token_ids=[] if tokens is None else [tokens[s]],
            last_sampled_input=tokens is None,
            start_pos=start_pos,
            new_block_ids=blocks.get(s, []),
            sample=True,
            output_index=start_pos - 2,
        )
        for s in (0, 1)
    ]
    return shard_pb2.StepRequest(step_id=step_id, chunks=chunks, num_steps=num_steps, after_step_id=step_id - 1 if tokens is None else 0)


def sampled(response: shard_pb2.StepResponse) -> list[tuple[int, int, float]]:
    return [(t.seq_id, t.token_id, round(t.logprob, 4)) for t in response.tokens]


def test_decodes_fed_their_last_sampled_token_give_the_tokens_of_decodes_that_name_it(runner):
    runs = [(3, 1), (4, 3), (7, 1), (8, 3)]  # (start_pos, num_steps): a decode run in between, whose last token feeds the next

    named = StepExecutor(runner, runner.parallel)
    response = named.run(prefill(1, 0))
    expected = sampled(response)
    for step, (start_pos, num_steps) in enumerate(runs):
        tokens = {t.seq_id: t.token_id for t in response.tokens[-2:]}
        response = named.run(decode(2 + step, start_pos, tokens, {0: [1, 8], 1: [3, 9]} if step == 0 else {}, num_steps))
        expected += sampled(response)

    fed = StepExecutor(runner, runner.parallel)
    got = sampled(fed.run(prefill(1, 4)))
    for step, (start_pos, num_steps) in enumerate(runs):
        got += sampled(fed.run(decode(2 + step, start_pos, None, {0: [5, 10], 1: [7, 11]} if step == 0 else {}, num_steps)))
    assert got == expected


def test_the_plan_check_takes_a_fed_decode_only_where_the_sequence_sampled_a_token(runner):
    limits = PlanLimits(16, 4, runner.config.vocab_size, 20, BatchLimits(16, 3, 4))
    executor = StepExecutor(runner, runner.parallel)
    executor.run(prefill(1, 0))  # both sequences sampled a token for position 3
    check_step(decode(2, 3, None, {}), executor.sequences, limits)
    check_step(decode(2, 3, None, {0: [1], 1: [3]}, num_steps=2), executor.sequences, limits)
    bad = {
        "sampled no token at position 4": decode(2, 4, None, {0: [1], 1: [3]}),
        "last_sampled_input is for a known sequence's decode, with no token_ids": shard_pb2.StepRequest(
            step_id=2, chunks=[shard_pb2.SeqChunk(seq_id=0, token_ids=[9], start_pos=3, sample=True, last_sampled_input=True)]
        ),
        "sequence 5 is not known": shard_pb2.StepRequest(
            step_id=2, chunks=[shard_pb2.SeqChunk(seq_id=5, start_pos=3, sample=True, last_sampled_input=True)]
        ),
    }
    for message, plan in bad.items():
        with pytest.raises(PlanError, match=message):
            check_step(plan, executor.sequences, limits)
    executor.run(shard_pb2.StepRequest(step_id=3, free_seq_ids=[0, 1]))
    with pytest.raises(PlanError, match="not known"):  # forgotten with its last sampled token
        check_step(decode(4, 3, None, {}), executor.sequences, limits)


class Context:
    """The parts of a gRPC servicer context StepOrder uses."""

    def __init__(self, deadline_s: float | None = 5.0) -> None:
        self.deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self.active = True
        self.callbacks = []

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def end(self) -> None:
        self.active = False
        for callback in self.callbacks:
            callback()


def test_a_step_that_arrives_before_the_one_it_follows_is_queued_after_it():
    order, queued = StepOrder(), []

    def send(step_id: int, after: int) -> None:
        order.queue(shard_pb2.StepRequest(step_id=step_id, after_step_id=after), Context(), lambda: queued.append(step_id))

    later = threading.Thread(target=send, args=(8, 7))
    later.start()
    time.sleep(0.05)
    assert queued == []  # step 8 waits for step 7
    send(7, 0)
    later.join(5)
    assert queued == [7, 8]
    send(9, 8)  # its predecessor is queued already: no wait
    assert queued == [7, 8, 9]


def test_a_step_whose_predecessor_never_comes_fails_at_its_deadline_or_when_its_call_ends():
    order = StepOrder()
    with pytest.raises(ValueError, match="follows step 3, which did not reach the driver in time"):
        order.queue(shard_pb2.StepRequest(step_id=4, after_step_id=3), Context(deadline_s=0.1), lambda: None)
    context = Context(deadline_s=None)
    threading.Timer(0.1, context.end).start()
    with pytest.raises(ValueError, match="the call ended before step 3 reached the driver"):
        order.queue(shard_pb2.StepRequest(step_id=4, after_step_id=3), context, lambda: None)
