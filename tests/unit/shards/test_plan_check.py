"""The driver's plan checks: every way a plan could reach outside the replica is refused, the
plans the gateway's scheduler sends pass, and a refused plan changes no sequence."""

from dataclasses import replace

import pytest

from shardgate.proto import shard_pb2
from shardgate.proto.shard_config import BatchLimits
from shardgate.shards.plan_check import PlanError, PlanLimits, check_embed, check_step
from shardgate.shards.sequences import SequenceTable

LIMITS = PlanLimits(
    num_kv_blocks=8, block_size=4, vocab_size=100, max_positions=20, batch=BatchLimits(max_batch_tokens=16, max_num_seqs=3, decode_steps=4)
)
SAMPLING = shard_pb2.Sampling(temperature=0.5, top_p=0.9, seed=3)


def new(seq_id, tokens=(1, 2, 3), blocks=(0,), start_pos=0):
    return shard_pb2.SeqChunk(seq_id=seq_id, token_ids=tokens, start_pos=start_pos, new_block_ids=blocks, sample=True, sampling=SAMPLING)


def delta(seq_id, start_pos, blocks=()):
    return shard_pb2.SeqChunk(seq_id=seq_id, token_ids=[7], start_pos=start_pos, new_block_ids=blocks, sample=True)


def plan(*chunks, **fields):
    return shard_pb2.StepRequest(step_id=2, chunks=list(chunks), **fields)


@pytest.fixture
def table():
    """Sequence 1 is known, with one block of 4 positions (3 computed)."""
    sequences = SequenceTable()
    sequences.apply(shard_pb2.StepRequest(step_id=1, chunks=[new(1)]))
    return sequences


def test_the_plans_the_scheduler_sends_pass(table):
    check_step(shard_pb2.StepRequest(step_id=2, chunks=[delta(1, 3), new(2, blocks=[1])]), table, LIMITS)
    check_step(shard_pb2.StepRequest(step_id=3, chunks=[delta(1, 3, blocks=[2])], num_steps=4), table, LIMITS)
    # a sequence freed and sent again in full in the same plan (a preemption's recompute)
    check_step(shard_pb2.StepRequest(step_id=4, free_seq_ids=[1], chunks=[new(1, tokens=[1] * 5, blocks=[3, 4])]), table, LIMITS)
    check_step(shard_pb2.StepRequest(step_id=5), table, LIMITS)


BAD_STEPS = {
    "num_steps 5 is above the replica's 4": plan(delta(1, 3, blocks=[2, 3]), num_steps=5),
    "4 chunks, above the replica's 3 sequences": plan(*(new(s, tokens=[1], blocks=[s]) for s in range(2, 6))),
    "17 tokens, above the replica's 16": plan(new(2, tokens=[1] * 17, blocks=[1, 2, 3, 4, 5])),
    "sequence 2 appears twice": plan(new(2, blocks=[1]), new(2, blocks=[2])),
    "sequence 9 is not known": plan(delta(9, 3)),
    "sequence 1 is not known": plan(delta(1, 3), free_seq_ids=[1]),
    "sampling: top_p must be in (0, 1]": plan(
        shard_pb2.SeqChunk(seq_id=2, token_ids=[1], new_block_ids=[1], sampling=shard_pb2.Sampling())
    ),
    "sampling: temperature must be >= 0": plan(
        shard_pb2.SeqChunk(seq_id=2, token_ids=[1], new_block_ids=[1], sampling=shard_pb2.Sampling(temperature=-1, top_p=1))
    ),
    "no token_ids": plan(new(2, tokens=[], blocks=[1])),
    "token id 100 is outside the vocabulary": plan(new(2, tokens=[1, 100], blocks=[1])),
    "block id 8 is outside the KV cache": plan(new(2, blocks=[1, 8])),
    "position 4 is past its 1 KV blocks": plan(delta(1, 4)),
    "position 6 is past its 1 KV blocks": plan(delta(1, 3), num_steps=4),
    "position 20 is past the model's 20 positions": plan(new(2, tokens=[1], blocks=[0] * 6, start_pos=20)),
    "must hold single-token decodes only": plan(new(2, blocks=[1, 2]), num_steps=2),
}


@pytest.mark.parametrize("message", BAD_STEPS)
def test_a_bad_plan_is_refused_and_changes_nothing(table, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_step(BAD_STEPS[message], table, LIMITS)
    assert len(table) == 1 and table.num_blocks(1) == 1


@pytest.mark.parametrize(
    "item, message",
    [
        (shard_pb2.EmbedInput(token_ids=[1, 2], block_ids=[0]), None),
        (shard_pb2.EmbedInput(token_ids=[1, 2], block_ids=[9]), "block id 9 is outside the KV cache"),
        (shard_pb2.EmbedInput(token_ids=[1] * 5, block_ids=[0]), "position 4 is past its 1 KV blocks"),
        (shard_pb2.EmbedInput(token_ids=[1] * 11, block_ids=[0, 1, 2]), "position 10 is past the model's 10 positions"),
        (shard_pb2.EmbedInput(token_ids=[250], block_ids=[0]), "token id 250 is outside the vocabulary"),
        (shard_pb2.EmbedInput(token_ids=[], block_ids=[0]), "no token_ids"),
    ],
)
def test_embed_inputs_must_fit_their_blocks_the_vocabulary_and_positions(item, message):
    request = shard_pb2.EmbedStepRequest(step_id=1, inputs=[item])
    limits = replace(LIMITS, max_positions=10)
    if message is None:
        check_embed(request, limits)
    else:
        with pytest.raises(PlanError, match=message):
            check_embed(request, limits)
    with pytest.raises(PlanError, match="no inputs"):
        check_embed(shard_pb2.EmbedStepRequest(step_id=1), LIMITS)


def test_an_embed_batch_fits_the_replicas_step():
    inputs = [shard_pb2.EmbedInput(token_ids=[1] * 4, block_ids=[b]) for b in range(5)]
    check_embed(shard_pb2.EmbedStepRequest(step_id=1, inputs=inputs[:4]), LIMITS)
    with pytest.raises(PlanError, match="20 tokens, above the replica's 16"):
        check_embed(shard_pb2.EmbedStepRequest(step_id=1, inputs=inputs), LIMITS)
