"""Each sequence's block table and sampling settings, as the gateway's step plans build them:
sent in full the first time, as deltas after."""

from __future__ import annotations

from shardgate.proto import shard_pb2
from shardgate.shards.runner import SeqChunk
from shardgate.shards.sampler import SamplingParams


class SequenceTable:
    def __init__(self) -> None:
        self._block_tables: dict[int, list[int]] = {}
        self._sampling: dict[int, SamplingParams] = {}

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

    def apply(self, request: shard_pb2.StepRequest) -> list[SeqChunk]:
        """Forgets the freed sequences, records new ones and block deltas; returns the batch.

        Raises ValueError for a chunk of a sequence it does not know."""
        for seq_id in request.free_seq_ids:
            self._block_tables.pop(seq_id, None)
            self._sampling.pop(seq_id, None)
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
