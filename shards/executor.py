"""Runs each step plan on every rank of the replica.

The driver (rank 0) receives the plan from the gateway and broadcasts it, as the bytes of a
RankCommand protobuf, to the other ranks on the gloo control group (a length, then the bytes:
no pickle). Every rank applies the same plan to its own sequence table and runs its part of the
model; the last stage's tp-rank 0 sends the sampled tokens (or pooled embeddings) back to the
driver when the driver is not on that stage.

Tracing: when the gateway's Step call carries a trace context (in the headers of the global
propagator), the driver opens a span for the step and writes its W3C traceparent into the plan
before broadcasting it, and every rank records
its forward as a child span (with its rank, tp rank, pipeline stage and communication times).
Timings: when the plan asks for them, or is traced, the driver gathers each rank's forward and
communication seconds and its memory (ten float64s per rank) on the control group after the
step; so a traced step's span also lasts until every rank is done.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from opentelemetry import context as otel_context
from opentelemetry import trace

from shardgate.proto import shard_pb2
from shardgate.proto.tracing import SHARD_STEP_RPC, context_from_traceparent, traceparent
from shardgate.shards.embedding import EmbedInput, embed
from shardgate.shards.faults import FaultInjector
from shardgate.shards.memory import RankMemory
from shardgate.shards.parallel import ParallelState
from shardgate.shards.runner import ModelRunner, SampleResult, SeqChunk
from shardgate.shards.sequences import SequenceTable
from shardgate.shards.timing import KINDS, CommTimer

log = logging.getLogger(__name__)
_STOP = -1
STEP_SPAN = "shardgate.shard.v1.Shard/Step"
"""The driver's span of a Step call, named as the RPC semantic conventions name a server span."""
STEP_ID = "shardgate.step.id"


@dataclass(frozen=True)
class RankTime:
    """This rank's time in one step."""

    forward_s: float
    timer: CommTimer | None
    """Its communication, when the step was timed."""


class StepExecutor:
    def __init__(
        self,
        runner: ModelRunner,
        parallel: ParallelState,
        tracer: trace.Tracer | None = None,
        faults: FaultInjector | None = None,
        memory: RankMemory | None = None,
    ) -> None:
        self.runner = runner
        self.memory = memory
        """What this rank reports of its memory with its timings (zeros when None)."""
        self.parallel = parallel
        self.tracer = tracer
        """None when this process exports no spans."""
        self.faults = faults or FaultInjector(None, -1, 0, parallel.rank)
        self.sequences = SequenceTable()
        self._distributed = parallel.config.world_size > 1

    def run(self, request: shard_pb2.StepRequest, parent: otel_context.Context | None = None) -> shard_pb2.StepResponse:
        """Driver: hand the plan to every rank, run it, return the sampled tokens. `parent` is
        the gateway's step span, when the step is traced.

        A chunk that takes its sequence's last sampled token as input (async scheduling) gets
        it here, before the other ranks see the plan; the tokens this plan samples last are
        remembered for the next.

        Raises ValueError for a malformed plan (every rank rejects it alike, before any
        collective, so the replica stays in step)."""
        span = None
        if parent is not None and self.tracer is not None:
            span = self.tracer.start_span(
                STEP_SPAN, parent, kind=trace.SpanKind.SERVER, attributes={**SHARD_STEP_RPC, STEP_ID: request.step_id}
            )
            request.traceparent = traceparent(span)
        else:
            request.traceparent = ""
        with trace.use_span(span, end_on_exit=True) if span is not None else contextlib.nullcontext():
            self.sequences.fill_sampled_inputs(request)
            if self._distributed:
                self._broadcast(shard_pb2.RankCommand(step=request).SerializeToString())
            results, last, time_spent = self._execute(request)
            if self._distributed and self.parallel.sampler_rank != 0:
                last = self._receive_samples(request)
            self.sequences.record_sampled(request, [result.token_id for result in last])
            results += last
            timings = self._gather_timings(time_spent) if _gathers(request) else []
        return shard_pb2.StepResponse(
            tokens=[shard_pb2.SampledToken(seq_id=r.seq_id, token_id=r.token_id, logprob=r.logprob or 0.0) for r in results],
            rank_timings=timings,
        )

    def embed(self, request: shard_pb2.EmbedStepRequest) -> shard_pb2.EmbedStepResponse:
        """Driver: run an embedding batch on every rank; return the pooled vectors."""
        if self._distributed:
            self._broadcast(shard_pb2.RankCommand(embed=request).SerializeToString())
        vectors = self._embed(request)
        if self._distributed and self.parallel.sampler_rank != 0:
            vectors = torch.empty(len(request.inputs), self.runner.config.hidden_size, dtype=torch.float32)
            dist.recv(vectors, src=self.parallel.sampler_rank, group=self.parallel.control)
        return shard_pb2.EmbedStepResponse(
            vectors=vectors.numpy().astype("<f4", copy=False).tobytes(),
            hidden_size=vectors.shape[1],
        )

    def forget_all(self) -> None:
        """Driver: every rank forgets every sequence (a new gateway session begins)."""
        if self._distributed:
            self._broadcast(shard_pb2.RankCommand(forget=shard_pb2.ForgetSequences()).SerializeToString())
        self.sequences.clear()

    def heartbeat(self) -> int:
        """Driver: a round trip with every rank on the control group; returns how many took
        part. While a rank does not answer (stopped, hung in a step) it blocks, and fails once
        the collective timeout passes."""
        if not self._distributed:
            return 1
        self._broadcast(shard_pb2.RankCommand(heartbeat=shard_pb2.HeartbeatRequest()).SerializeToString())
        return self._count_ranks()

    def follow(self) -> None:
        """Every other rank: run the driver's commands until it says stop."""
        reports = self.parallel.rank == self.parallel.sampler_rank != 0
        while (data := self._broadcast(None)) is not None:
            command = shard_pb2.RankCommand.FromString(data)
            if command.HasField("forget"):
                self.sequences.clear()
                continue
            if command.HasField("heartbeat"):
                self._count_ranks()
                continue
            try:
                if command.HasField("embed"):
                    vectors = self._embed(command.embed)
                    if reports:
                        dist.send(vectors, dst=0, group=self.parallel.control)
                    continue
                _, last, time_spent = self._execute(command.step)
            except ValueError as error:
                log.error("rank %d rejected a %s: %s", self.parallel.rank, command.WhichOneof("command"), error)
                continue
            if reports:
                self._send_samples(last)
            if _gathers(command.step):
                self._gather_timings(time_spent)

    def stop(self) -> None:
        """Driver: release the other ranks from follow()."""
        if self._distributed:
            self._broadcast(b"", stop=True)

    def _execute(self, request: shard_pb2.StepRequest) -> tuple[list[SampleResult], list[SampleResult], RankTime]:
        """Runs the plan's steps. Returns the samples of the steps before the last (every rank
        receives those: they feed the next step), the last step's samples (on the last pipeline
        stage; the sampler rank's are the ones reported) and this rank's time."""
        self.faults.on_step(chunk.token_ids for chunk in request.chunks)
        traced = bool(request.traceparent) and self.tracer is not None
        timer = CommTimer(self.runner.device) if _gathers(request) else None
        chunks = self.sequences.apply(request)
        num_steps = max(request.num_steps, 1)
        start_ns, started = time.time_ns(), time.perf_counter()
        earlier: list[SampleResult] = []
        for _ in range(num_steps - 1):
            shared = self._share_samples(self.runner.step(chunks, timer), chunks)
            earlier.extend(shared)
            chunks = [
                replace(chunk, token_ids=[result.token_id], start_pos=chunk.start_pos + 1, output_index=chunk.output_index + 1)
                for chunk, result in zip(chunks, shared)
            ]
        last = self.runner.step(chunks, timer)
        if timer is not None:
            timer.finish()
        forward = RankTime(time.perf_counter() - started, timer)
        if traced:
            self._record_forward(request, chunks, start_ns, forward)
        return earlier, last, forward

    def _share_samples(self, results: list[SampleResult], chunks: list[SeqChunk]) -> list[SampleResult]:
        """Every rank gets the sampler rank's tokens (and logprobs) of a step: the next step's inputs."""
        if not self._distributed:
            return results
        values = torch.empty(2, len(chunks), dtype=torch.float64)  # token ids (exact below 2**53), logprobs
        if self.parallel.rank == self.parallel.sampler_rank:
            values[0] = torch.tensor([r.token_id for r in results], dtype=torch.float64)
            values[1] = torch.tensor([r.logprob or 0.0 for r in results], dtype=torch.float64)
        dist.broadcast(values, src=self.parallel.sampler_rank, group=self.parallel.control)
        tokens, logprobs = values.tolist()
        return [
            SampleResult(chunk.seq_id, int(token), logprob if chunk.sampling.logprobs else None)
            for chunk, token, logprob in zip(chunks, tokens, logprobs)
        ]

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

    def _record_forward(self, request: shard_pb2.StepRequest, chunks: list[SeqChunk], start_ns: int, forward: RankTime) -> None:
        """This rank's forward span, beneath the driver's span of the step."""
        parallel = self.parallel
        attributes = {
            "shardgate.shard.rank": parallel.rank,
            "shardgate.shard.tp_rank": parallel.tp_rank,
            "shardgate.shard.pp_stage": parallel.pp_stage,
            STEP_ID: request.step_id,
            "shardgate.shard.tokens": sum(len(chunk.token_ids) for chunk in chunks),
        }
        for kind in KINDS:
            attributes[f"shardgate.shard.{kind}.seconds"] = forward.timer.seconds[kind]
            attributes[f"shardgate.shard.{kind}.count"] = forward.timer.counts[kind]
        span = self.tracer.start_span("forward", context_from_traceparent(request.traceparent), attributes=attributes, start_time=start_ns)
        span.end(end_time=start_ns + int(forward.forward_s * 1e9))

    def _gather_timings(self, time_spent: RankTime) -> list[shard_pb2.RankTiming]:
        """Every rank's timings and memory, in rank order, on the driver (others send theirs and get [])."""
        seconds = time_spent.timer.seconds
        memory = (self.memory.weights_bytes, self.memory.kv_cache_bytes, *self.memory.sample()) if self.memory else (0,) * 5
        row = torch.tensor([time_spent.forward_s, *(seconds[kind] for kind in KINDS), *memory], dtype=torch.float64)
        rows = [row]
        if self._distributed:
            rows = [torch.empty_like(row) for _ in range(self.parallel.config.world_size)] if self.parallel.is_driver else None
            dist.gather(row, rows, dst=0, group=self.parallel.control)
        if not self.parallel.is_driver:
            return []
        return [
            shard_pb2.RankTiming(
                rank=rank,
                forward_s=forward_s,
                all_reduce_s=all_reduce,
                all_gather_s=all_gather,
                pp_send_s=send,
                pp_recv_s=recv,
                weights_bytes=int(weights),
                kv_cache_bytes=int(kv_cache),
                activation_peak_bytes=int(activation),
                device_memory_free_bytes=int(free),
                device_memory_total_bytes=int(total),
            )
            for rank, (forward_s, all_reduce, all_gather, send, recv, weights, kv_cache, activation, free, total) in enumerate(
                r.tolist() for r in rows
            )
        ]

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

    def _count_ranks(self) -> int:
        count = torch.ones(1, dtype=torch.int64)
        dist.all_reduce(count, group=self.parallel.control)
        return int(count.item())

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


def _gathers(request: shard_pb2.StepRequest) -> bool:
    """Whether the ranks time the step and the driver gathers their timings: decided by the
    plan alone, so that every rank agrees."""
    return request.report_timings or bool(request.traceparent)
