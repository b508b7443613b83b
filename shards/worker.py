"""The driver's gRPC service: keeps each sequence's block table and sampling settings (sent
in full once, then as deltas) and runs the gateway's step plans on the model runner."""

from __future__ import annotations

import time

import grpc

from shardgate.proto import shard_pb2, shard_pb2_grpc
from shardgate.shards.embedding import EmbedInput, embed
from shardgate.shards.runner import ModelRunner, SeqChunk
from shardgate.shards.sampler import SamplingParams


class ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(self, runner: ModelRunner, description: shard_pb2.DescribeResponse) -> None:
        self.runner = runner
        self.description = description
        self._block_tables: dict[int, list[int]] = {}
        self._sampling: dict[int, SamplingParams] = {}

    def Describe(self, request, context) -> shard_pb2.DescribeResponse:
        return self.description

    def Step(self, request: shard_pb2.StepRequest, context) -> shard_pb2.StepResponse:
        for seq_id in request.free_seq_ids:
            self._block_tables.pop(seq_id, None)
            self._sampling.pop(seq_id, None)
        chunks = []
        for chunk in request.chunks:
            if chunk.HasField("sampling"):
                self._block_tables[chunk.seq_id] = list(chunk.new_block_ids)
                self._sampling[chunk.seq_id] = _sampling_params(chunk.sampling)
            elif chunk.seq_id in self._block_tables:
                self._block_tables[chunk.seq_id].extend(chunk.new_block_ids)
            else:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"step {request.step_id}: unknown sequence {chunk.seq_id}")
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
        start = time.perf_counter()
        results = self.runner.step(chunks)
        compute_s = time.perf_counter() - start
        return shard_pb2.StepResponse(
            tokens=[
                shard_pb2.SampledToken(seq_id=r.seq_id, token_id=r.token_id, logprob=r.logprob or 0.0) for r in results
            ],
            compute_s=compute_s,
        )


    def Embed(self, request: shard_pb2.EmbedStepRequest, context) -> shard_pb2.EmbedStepResponse:
        inputs = [
            EmbedInput(
                token_ids=list(item.token_ids),
                block_table=list(item.block_ids),
                last=item.pooling == shard_pb2.POOLING_LAST,
                normalize=item.normalize,
            )
            for item in request.inputs
        ]
        start = time.perf_counter()
        vectors = embed(self.runner, inputs).cpu()  # (N, hidden) float32
        return shard_pb2.EmbedStepResponse(
            vectors=vectors.numpy().astype("<f4", copy=False).tobytes(),
            hidden_size=vectors.shape[1],
            compute_s=time.perf_counter() - start,
        )


def _sampling_params(message: shard_pb2.Sampling) -> SamplingParams:
    return SamplingParams(
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        seed=message.seed,
        logprobs=message.logprobs,
    )
