"""plan_to_proto (server/replicas/client.py): a step plan as the replica receives it. A sequence
new to the replica comes with its sampling settings and whole block table; a running one comes
as a delta (its new tokens and blocks, no settings)."""

import pytest

from shardgate.proto import shard_pb2
from shardgate.server.replicas.client import plan_to_proto
from shardgate.server.request import Request, SamplingParams
from shardgate.server.scheduler import ScheduledChunk, StepPlan

SAMPLED = SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9, top_k=20, seed=2**63 - 1, ignore_eos=False, logprobs=True)
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=5, ignore_eos=True, logprobs=False)


def request(seq_id: int, prompt: list[int], output: list[int] = (), params: SamplingParams = SAMPLED) -> Request:
    return Request(seq_id, f"r{seq_id}", list(prompt), params, output_ids=list(output))


def chunk(request: Request, start_pos: int, num_tokens: int, blocks: list[int], *, sample: bool, is_new: bool) -> ScheduledChunk:
    return ScheduledChunk(request, start_pos, num_tokens, blocks, sample, is_new, output_index=len(request.output_ids))


def wire(plan: StepPlan) -> shard_pb2.StepRequest:
    """The message as the driver parses it."""
    return shard_pb2.StepRequest.FromString(plan_to_proto(plan).SerializeToString())


def test_new_sequence_is_sent_in_full_with_its_sampling_settings():
    prompt = list(range(100, 110))
    new = request(7, prompt)
    [message] = wire(StepPlan(step_id=3, chunks=[chunk(new, 0, 6, [4, 9], sample=False, is_new=True)])).chunks
    assert message.seq_id == 7 and list(message.token_ids) == prompt[:6] and message.start_pos == 0
    assert list(message.new_block_ids) == [4, 9] and not message.sample and message.output_index == 0
    assert message.HasField("sampling")
    sampling = message.sampling
    assert sampling.temperature == pytest.approx(0.7) and sampling.top_p == pytest.approx(0.9)
    assert (sampling.top_k, sampling.seed, sampling.logprobs) == (20, 2**63 - 1, True)


def test_greedy_new_sequence_still_carries_its_settings():
    [message] = wire(StepPlan(step_id=1, chunks=[chunk(request(1, [1, 2, 3], params=GREEDY), 0, 3, [0], sample=True, is_new=True)])).chunks
    assert message.HasField("sampling")
    assert (message.sampling.temperature, message.sampling.top_p, message.sampling.top_k, message.sampling.seed) == (0.0, 1.0, 0, 5)
    assert not message.sampling.logprobs


def test_running_sequence_is_a_delta_without_sampling_settings():
    running = request(8, [1, 2, 3, 4], output=[50, 51, 52])
    # The second half of a chunked prefill, then a decode of the last sampled token.
    prefill = chunk(request(9, list(range(20))), 12, 8, [6], sample=True, is_new=False)
    decode = chunk(running, 6, 1, [], sample=True, is_new=False)
    first, second = wire(StepPlan(step_id=4, chunks=[prefill, decode])).chunks
    assert (first.seq_id, list(first.token_ids), first.start_pos, list(first.new_block_ids)) == (9, list(range(12, 20)), 12, [6])
    assert first.sample and first.output_index == 0 and not first.HasField("sampling")
    assert (second.seq_id, list(second.token_ids), second.start_pos, list(second.new_block_ids)) == (8, [52], 6, [])
    assert second.sample and second.output_index == 3 and not second.HasField("sampling")


def test_recomputed_sequence_sends_prompt_and_output_tokens_from_its_start_pos():
    # Preempted after three tokens, back with its first block from the prefix cache: the replica
    # gets the whole table again, the tokens from position 2 on across prompt and output, and
    # the index of the next draw.
    again = request(11, [1, 2, 3, 4], output=[60, 61, 62])
    [message] = wire(StepPlan(step_id=9, chunks=[chunk(again, 2, 5, [3, 7, 8], sample=True, is_new=True)])).chunks
    assert list(message.token_ids) == [3, 4, 60, 61, 62] and message.start_pos == 2
    assert list(message.new_block_ids) == [3, 7, 8] and message.output_index == 3
    assert message.HasField("sampling") and message.sampling.seed == 2**63 - 1


def test_plan_fields_step_id_freed_sequences_and_decode_steps():
    decodes = [chunk(request(i, [1, 2], output=[5]), 2, 1, [], sample=True, is_new=False) for i in (21, 20, 22)]
    preempted = request(30, [9, 9])
    plan = StepPlan(step_id=2**40, chunks=decodes, free_seq_ids=[13, 5], preempted=[preempted], num_steps=4)
    message = wire(plan)
    assert message.step_id == 2**40 and list(message.free_seq_ids) == [13, 5] and message.num_steps == 4
    assert [c.seq_id for c in message.chunks] == [21, 20, 22]  # the plan's order
    assert not message.report_timings and not message.traceparent  # set by the caller, not from the plan


def test_empty_plan_only_frees():
    message = wire(StepPlan(step_id=6, free_seq_ids=[1, 2, 3]))
    assert list(message.chunks) == [] and list(message.free_seq_ids) == [1, 2, 3] and message.num_steps == 1


def test_a_decode_of_a_token_in_flight_names_no_token_and_follows_the_step_that_samples_it():
    # Async scheduling: step 8 samples the request's fourth token while step 9 is planned; step 9
    # decodes that token at position 7 and draws the fifth.
    running = request(8, [1, 2, 3, 4], output=[50, 51, 52])
    decode = ScheduledChunk(running, 7, 1, [5], True, False, output_index=4, last_sampled_input=True)
    message = wire(StepPlan(step_id=9, chunks=[decode], after_step_id=8))
    [sent] = message.chunks
    assert message.after_step_id == 8 and sent.last_sampled_input and list(sent.token_ids) == []
    assert (sent.start_pos, list(sent.new_block_ids), sent.sample, sent.output_index) == (7, [5], True, 4)
