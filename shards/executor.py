"""Runs each step plan on every rank of the replica.

The driver (rank 0) receives the plan from the gateway and broadcasts it, as the bytes of a
RankCommand protobuf, to the other ranks on the gloo control group (a length, then the bytes:
no pickle). Every rank applies the same plan to its own sequence table and runs its part of the
model; the last stage's tp-rank 0 sends the sampled tokens (or pooled embeddings) back to the
driver when the driver is not on that stage.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from shardgate.proto import shard_pb2
from shardgate.shards.embedding import EmbedInput, embed
from shardgate.shards.faults import FaultInjector
from shardgate.shards.parallel import ParallelState
from shardgate.shards.runner import ModelRunner, SampleResult
from shardgate.shards.sequences import SequenceTable

log = logging.getLogger(__name__)
_STOP = -1


class StepExecutor:
    def __init__(self, runner: ModelRunner, parallel: ParallelState, faults: FaultInjector | None = None) -> None:
        self.runner = runner
        self.parallel = parallel
        self.faults = faults or FaultInjector(parallel.rank, None)
        self.sequences = SequenceTable()
        self._distributed = parallel.config.world_size > 1

    def run(self, request: shard_pb2.StepRequest) -> shard_pb2.StepResponse:
        """Driver: hand the plan to every rank, run it, return the sampled tokens.

        Raises ValueError for a malformed plan (every rank rejects it alike, before any
        collective, so the replica stays in step)."""
        start = time.perf_counter()
        if self._distributed:
            self._broadcast(shard_pb2.RankCommand(step=request).SerializeToString())
        results = self._execute(request)
        if self._distributed and self.parallel.sampler_rank != 0:
            results = self._receive_samples(request)
        return shard_pb2.StepResponse(
            tokens=[shard_pb2.SampledToken(seq_id=r.seq_id, token_id=r.token_id, logprob=r.logprob or 0.0) for r in results],
            compute_s=time.perf_counter() - start,
        )

    def embed(self, request: shard_pb2.EmbedStepRequest) -> shard_pb2.EmbedStepResponse:
        """Driver: run an embedding batch on every rank; return the pooled vectors."""
        start = time.perf_counter()
        if self._distributed:
            self._broadcast(shard_pb2.RankCommand(embed=request).SerializeToString())
        vectors = self._embed(request)
        if self._distributed and self.parallel.sampler_rank != 0:
            vectors = torch.empty(len(request.inputs), self.runner.config.hidden_size, dtype=torch.float32)
            dist.recv(vectors, src=self.parallel.sampler_rank, group=self.parallel.control)
        return shard_pb2.EmbedStepResponse(
            vectors=vectors.numpy().astype("<f4", copy=False).tobytes(),
            hidden_size=vectors.shape[1],
            compute_s=time.perf_counter() - start,
        )

    def follow(self) -> None:
        """Every other rank: run the driver's commands until it says stop."""
        reports = self.parallel.rank == self.parallel.sampler_rank != 0
        while (data := self._broadcast(None)) is not None:
            command = shard_pb2.RankCommand.FromString(data)
            try:
                if command.HasField("embed"):
                    vectors = self._embed(command.embed)
                    if reports:
                        dist.send(vectors, dst=0, group=self.parallel.control)
                else:
                    results = self._execute(command.step)
                    if reports:
                        self._send_samples(results)
            except ValueError as error:
                log.error("rank %d rejected a %s: %s", self.parallel.rank, command.WhichOneof("command"), error)

    def stop(self) -> None:
        """Driver: release the other ranks from follow()."""
        if self._distributed:
            self._broadcast(b"", stop=True)

    def _execute(self, request: shard_pb2.StepRequest) -> list[SampleResult]:
        self.faults.on_step()
        return self.runner.step(self.sequences.apply(request))

    def _embed(self, request: shard_pb2.EmbedStepRequest) -> torch.Tensor | None:
        """Pooled vectors (N, hidden) float32 on CPU on the last stage; None elsewhere."""
        inputs = [
            EmbedInput(
                token_ids=list(item.token_ids),
                block_table=list(item.block_ids),
                last=item.pooling == shard_pb2.POOLING_LAST,
                normalize=item.normalize,
            )
            for item in request.inputs
        ]
        vectors = embed(self.runner, inputs)
        return None if vectors is None else vectors.cpu().contiguous()

    def _broadcast(self, data: bytes | None, stop: bool = False) -> bytes | None:
        group = self.parallel.control
        size = torch.tensor([_STOP if stop else len(data or b"")], dtype=torch.int64)
        dist.broadcast(size, src=0, group=group)
        if size.item() == _STOP:
            return None
        if data is not None:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        else:
            buffer = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buffer, src=0, group=group)
        return buffer.numpy().tobytes()

    def _send_samples(self, results: list[SampleResult]) -> None:
        tokens = torch.tensor([r.token_id for r in results], dtype=torch.int64)
        logprobs = torch.tensor([r.logprob or 0.0 for r in results], dtype=torch.float32)
        dist.send(tokens, dst=0, group=self.parallel.control)
        dist.send(logprobs, dst=0, group=self.parallel.control)

    def _receive_samples(self, request: shard_pb2.StepRequest) -> list[SampleResult]:
        sampled = [chunk.seq_id for chunk in request.chunks if chunk.sample]
        tokens = torch.empty(len(sampled), dtype=torch.int64)
        logprobs = torch.empty(len(sampled), dtype=torch.float32)
        dist.recv(tokens, src=self.parallel.sampler_rank, group=self.parallel.control)
        dist.recv(logprobs, src=self.parallel.sampler_rank, group=self.parallel.control)
        return [SampleResult(seq_id, int(t), float(lp)) for seq_id, t, lp in zip(sampled, tokens.tolist(), logprobs.tolist())]
