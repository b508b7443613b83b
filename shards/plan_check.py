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

    def check_tokens(self, where: str, token_ids) -> None:
        if not token_ids:
            raise PlanError(f"{where}: no token_ids")
        if max(token_ids) >= self.vocab_size:
            raise PlanError(f"{where}: token id {max(token_ids)} is outside the vocabulary ({self.vocab_size})")

    def check_blocks(self, where: str, block_ids) -> None:
        if block_ids and max(block_ids) >= self.num_kv_blocks:
            raise PlanError(f"{where}: block id {max(block_ids)} is outside the KV cache (blocks 0-{self.num_kv_blocks - 1})")

    def check_span(self, where: str, end: int, num_blocks: int) -> None:
        """Positions [.., end) must lie in the sequence's blocks and the model's positions."""
        if end > num_blocks * self.block_size:
            raise PlanError(f"{where}: position {end - 1} is past its {num_blocks} KV blocks of {self.block_size} tokens")
        if end > self.max_positions:
            raise PlanError(f"{where}: position {end - 1} is past the model's {self.max_positions} positions")


def check_step(request: shard_pb2.StepRequest, sequences: SequenceTable, limits: PlanLimits) -> None:
    """Raises PlanError unless the replica can run the plan as it stands."""
    step = f"step {request.step_id}"
    batch = limits.batch
    num_steps = max(request.num_steps, 1)
    if num_steps > batch.decode_steps:
        raise PlanError(f"{step}: num_steps {num_steps} is above the replica's {batch.decode_steps} (--decode-steps)")
    if len(request.chunks) > batch.max_num_seqs:
        raise PlanError(f"{step}: {len(request.chunks)} chunks, above the replica's {batch.max_num_seqs} sequences (--max-num-seqs)")
    num_tokens = sum(len(chunk.token_ids) for chunk in request.chunks)
    if num_tokens > batch.max_batch_tokens:
        raise PlanError(f"{step}: {num_tokens} tokens, above the replica's {batch.max_batch_tokens} (--max-batch-tokens)")
    freed = set(request.free_seq_ids)
    seen: set[int] = set()
    for chunk in request.chunks:
        where = f"{step}: sequence {chunk.seq_id}"
        if chunk.seq_id in seen:
            raise PlanError(f"{where} appears twice")
        seen.add(chunk.seq_id)
        if chunk.HasField("sampling"):
            num_blocks = 0
            try:
                sampling_params(chunk.sampling)
            except ValueError as error:
                raise PlanError(f"{where}: sampling: {error}") from None
        else:
            known = None if chunk.seq_id in freed else sequences.num_blocks(chunk.seq_id)
            if known is None:
                raise PlanError(f"{where} is not known to the replica (a new sequence carries its sampling)")
            num_blocks = known
        limits.check_tokens(where, chunk.token_ids)
        limits.check_blocks(where, chunk.new_block_ids)
        if num_steps > 1 and not (len(chunk.token_ids) == 1 and chunk.sample):
            raise PlanError(f"{where}: a plan of {num_steps} steps must hold single-token decodes only")
        limits.check_span(where, chunk.start_pos + len(chunk.token_ids) + num_steps - 1, num_blocks + len(chunk.new_block_ids))


def check_embed(request: shard_pb2.EmbedStepRequest, limits: PlanLimits) -> None:
    """Raises PlanError unless the batch fits the replica's step and every input its lent
    blocks, the vocabulary and the positions."""
    if not request.inputs:
        raise PlanError(f"embed batch {request.step_id}: no inputs")
    num_tokens = sum(len(item.token_ids) for item in request.inputs)
    if num_tokens > limits.batch.max_batch_tokens:
        raise PlanError(
            f"embed batch {request.step_id}: {num_tokens} tokens, above the replica's {limits.batch.max_batch_tokens} (--max-batch-tokens)"
        )
    for index, item in enumerate(request.inputs):
        where = f"embed batch {request.step_id}: input {index}"
        limits.check_tokens(where, item.token_ids)
        limits.check_blocks(where, item.block_ids)
        limits.check_span(where, len(item.token_ids), len(item.block_ids))
