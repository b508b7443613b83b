"""Each sequence's block table and sampling settings, as the gateway's step plans build them:
sent in full the first time, as deltas after; and, on the driver, the token each sequence
sampled last, which a plan's decode may take as its input (async scheduling)."""

from __future__ import annotations

from shardgate.proto import shard_pb2
from shardgate.shards.runner import SeqChunk
from shardgate.shards.sampler import SamplingParams


class SequenceTable:
    def __init__(self) -> None:
        self._block_tables: dict[int, list[int]] = {}
        self._sampling: dict[int, SamplingParams] = {}
        self._last_sampled: dict[int, tuple[int, int]] = {}
        """Driver only: seq_id -> (position, token id) of the token it sampled last, whose KV the
        sequence's next decode computes at that position."""

    def __len__(self) -> int:
        return len(self._block_tables)

    def num_blocks(self, seq_id: int) -> int | None:
        """Blocks in a known sequence's table; None for a sequence the table does not hold."""
        table = self._block_tables.get(seq_id)
        return None if table is None else len(table)

    def clear(self) -> None:
        """Forgets every sequence."""
        self._block_tables.clear()
        self._sampling.clear()
        self._last_sampled.clear()

    def last_sampled(self, seq_id: int) -> tuple[int, int] | None:
        """(position, token id) of the token the sequence sampled last; None when none is known."""
        return self._last_sampled.get(seq_id)

    def record_sampled(self, request: shard_pb2.StepRequest, tokens: list[int]) -> None:
        """Driver: remembers the tokens the plan's last step sampled (one per sampling chunk, in
        chunk order), each at the position its sequence's next decode computes."""
        last_step = max(request.num_steps, 1) - 1
        sampling = (chunk for chunk in request.chunks if chunk.sample)
        for chunk, token in zip(sampling, tokens, strict=True):
            self._last_sampled[chunk.seq_id] = (chunk.start_pos + len(chunk.token_ids) + last_step, token)

    def fill_sampled_inputs(self, request: shard_pb2.StepRequest) -> None:
        """Driver: gives each chunk that takes the sequence's last sampled token as its input
        (SeqChunk.last_sampled_input) that token, so the other ranks get a plain plan.

        Raises ValueError when the sequence sampled no token at the chunk's position."""
        for chunk in request.chunks:
            if not chunk.last_sampled_input:
                continue
            last = self._last_sampled.get(chunk.seq_id)
            if chunk.token_ids or last is None or last[0] != chunk.start_pos:
                raise ValueError(f"step {request.step_id}: sequence {chunk.seq_id} sampled no token at position {chunk.start_pos}")
            chunk.token_ids.append(last[1])
            chunk.last_sampled_input = False

    def apply(self, request: shard_pb2.StepRequest) -> list[SeqChunk]:
        """Forgets the freed sequences, records new ones and block deltas; returns the batch.

        Raises ValueError for a chunk of a sequence it does not know."""
        for seq_id in request.free_seq_ids:
            self._block_tables.pop(seq_id, None)
            self._sampling.pop(seq_id, None)
            self._last_sampled.pop(seq_id, None)
        chunks = []
        for chunk in request.chunks:
            if chunk.HasField("sampling"):
                self._block_tables[chunk.seq_id] = list(chunk.new_block_ids)
                self._sampling[chunk.seq_id] = sampling_params(chunk.sampling)
            elif chunk.seq_id in self._block_tables:
                self._block_tables[chunk.seq_id].extend(chunk.new_block_ids)
            else:
                raise ValueError(f"step {request.step_id}: unknown sequence {chunk.seq_id}")
            chunks.append(
                SeqChunk(
                    seq_id=chunk.seq_id,
                    token_ids=list(chunk.token_ids),
                    start_pos=chunk.start_pos,
                    block_table=self._block_tables[chunk.seq_id],
                    sample=chunk.sample,
                    sampling=self._sampling[chunk.seq_id],
                    output_index=chunk.output_index,
                )
            )
        return chunks


def sampling_params(message: shard_pb2.Sampling) -> SamplingParams:
    return SamplingParams(
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        seed=message.seed,
        logprobs=message.logprobs,
    )
