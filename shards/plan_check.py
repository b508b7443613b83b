"""The driver's checks of a plan before any rank runs it: a plan that would index past the KV
cache, the vocabulary or the positions, run more steps, tokens or sequences than the replica
profiled, or name a sequence the replica does not hold is refused whole (PlanError →
INVALID_ARGUMENT), before it is broadcast, so no rank and no KV block is touched and the replica
keeps serving. The gateway's scheduler never sends such a plan; these checks stand between the
KV cache and anything else that reaches the driver's port."""

from __future__ import annotations

from dataclasses import dataclass

from shardgate.proto import shard_pb2
from shardgate.proto.shard_config import BatchLimits
from shardgate.shards.sequences import SequenceTable, sampling_params


class PlanError(ValueError):
    """A plan the replica refuses; the message names the step, the field and the value."""


@dataclass(frozen=True)
class PlanLimits:
    """What a plan must stay within: the replica's cache, vocabulary and positions, and the
    largest step it profiled its memory at."""

    num_kv_blocks: int
    block_size: int
    vocab_size: int
    max_positions: int
    batch: BatchLimits

    @classmethod
    def of(cls, description: shard_pb2.DescribeResponse, batch: BatchLimits) -> PlanLimits:
        return cls(
            description.num_kv_blocks, description.block_size, description.model.vocab_size, description.max_position_embeddings, batch
        )

    def input_error(self, token_ids, block_ids, end: int, num_blocks: int) -> str | None:
        """What is wrong with one sequence's work (None: nothing): its tokens, its new blocks, and
        its positions [.., end), which must lie in its num_blocks blocks and the model's positions."""
        if not token_ids:
            return "no token_ids"
        if (top := max(token_ids)) >= self.vocab_size:
            return f"token id {top} is outside the vocabulary ({self.vocab_size})"
        if block_ids and (top := max(block_ids)) >= self.num_kv_blocks:
            return f"block id {top} is outside the KV cache (blocks 0-{self.num_kv_blocks - 1})"
        if end > num_blocks * self.block_size:
            return f"position {end - 1} is past its {num_blocks} KV blocks of {self.block_size} tokens"
        if end > self.max_positions:
            return f"position {end - 1} is past the model's {self.max_positions} positions"
        return None


def check_step(request: shard_pb2.StepRequest, sequences: SequenceTable, limits: PlanLimits) -> None:
    """Raises PlanError unless the replica can run the plan as it stands. (On the path of every
    step: each repeated field is read once, and messages are formatted only to raise.)"""
    batch = limits.batch
    num_steps = max(request.num_steps, 1)
    if num_steps > batch.decode_steps:
        raise PlanError(f"step {request.step_id}: num_steps {num_steps} is above the replica's {batch.decode_steps} (--decode-steps)")
    chunks = request.chunks
    if len(chunks) > batch.max_num_seqs:
        raise PlanError(
            f"step {request.step_id}: {len(chunks)} chunks, above the replica's {batch.max_num_seqs} sequences (--max-num-seqs)"
        )
    freed = set(request.free_seq_ids)
    seen: set[int] = set()
    num_tokens = 0
    for chunk in chunks:
        seq_id, token_ids = chunk.seq_id, chunk.token_ids
        if seq_id in seen:
            raise PlanError(f"step {request.step_id}: sequence {seq_id} appears twice")
        seen.add(seq_id)
        if chunk.HasField("sampling"):
            num_blocks = 0
            try:
                sampling_params(chunk.sampling)
            except ValueError as error:
                raise PlanError(f"step {request.step_id}: sequence {seq_id}: sampling: {error}") from None
        else:
            known = None if seq_id in freed else sequences.num_blocks(seq_id)
            if known is None:
                raise PlanError(
                    f"step {request.step_id}: sequence {seq_id} is not known to the replica (a new sequence carries its sampling)"
                )
            num_blocks = known
        if chunk.last_sampled_input:
            token_ids = _last_sampled_input(request.step_id, chunk, sequences)
        length = len(token_ids)
        if num_steps > 1 and not (length == 1 and chunk.sample):
            raise PlanError(f"step {request.step_id}: sequence {seq_id}: a plan of {num_steps} steps must hold single-token decodes only")
        block_ids = chunk.new_block_ids
        end = chunk.start_pos + length + num_steps - 1
        if error := limits.input_error(token_ids, block_ids, end, num_blocks + len(block_ids)):
            raise PlanError(f"step {request.step_id}: sequence {seq_id}: {error}")
        num_tokens += length
    if num_tokens > batch.max_batch_tokens:
        raise PlanError(f"step {request.step_id}: {num_tokens} tokens, above the replica's {batch.max_batch_tokens} (--max-batch-tokens)")


def _last_sampled_input(step_id: int, chunk: shard_pb2.SeqChunk, sequences: SequenceTable) -> list[int]:
    """The input of a chunk that takes its sequence's last sampled token (a known sequence's
    single-token decode): that token, when the sequence sampled one at the chunk's position."""
    if chunk.HasField("sampling") or chunk.token_ids or not chunk.sample:
        raise PlanError(f"step {step_id}: sequence {chunk.seq_id}: last_sampled_input is for a known sequence's decode, with no token_ids")
    last = sequences.last_sampled(chunk.seq_id)
    if last is None or last[0] != chunk.start_pos:
        raise PlanError(f"step {step_id}: sequence {chunk.seq_id} sampled no token at position {chunk.start_pos} (last_sampled_input)")
    return [last[1]]


def check_embed(request: shard_pb2.EmbedStepRequest, limits: PlanLimits) -> None:
    """Raises PlanError unless the batch fits the replica's step and every input its lent
    blocks, the vocabulary and the positions."""
    inputs = request.inputs
    if not inputs:
        raise PlanError(f"embed batch {request.step_id}: no inputs")
    num_tokens = 0
    for index, item in enumerate(inputs):
        token_ids, block_ids = item.token_ids, item.block_ids
        if error := limits.input_error(token_ids, block_ids, len(token_ids), len(block_ids)):
            raise PlanError(f"embed batch {request.step_id}: input {index}: {error}")
        num_tokens += len(token_ids)
    if num_tokens > limits.batch.max_batch_tokens:
        raise PlanError(
            f"embed batch {request.step_id}: {num_tokens} tokens, above the replica's {limits.batch.max_batch_tokens} (--max-batch-tokens)"
        )
