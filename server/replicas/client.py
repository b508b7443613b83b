"""The gateway's handle on one replica: its description (shard.proto's DescribeResponse, kept as
the message) and the Step, Embed and Heartbeat RPCs to its driver."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from shardgate.proto import shard_pb2, shard_pb2_grpc
from shardgate.proto.common import INTERNAL_MESSAGE_BYTES
from shardgate.server.embed_batcher import Pooling
from shardgate.server.scheduler import StepPlan

INTERNAL_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", INTERNAL_MESSAGE_BYTES),
    ("grpc.max_send_message_length", INTERNAL_MESSAGE_BYTES),
    # The driver's socket appears only once its model has loaded: retry connecting quickly.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass(frozen=True)
class EmbedItem:
    """One input of an embedding forward."""

    token_ids: list[int]
    block_ids: list[int]
    """KV blocks lent for this forward, covering len(token_ids) tokens."""
    pooling: Pooling
    normalize: bool


_POOLING = {Pooling.MEAN: shard_pb2.POOLING_MEAN, Pooling.LAST: shard_pb2.POOLING_LAST}


def plan_to_proto(plan: StepPlan) -> shard_pb2.StepRequest:
    chunks = []
    for chunk in plan.chunks:
        request = chunk.request
        params = request.params
        message = shard_pb2.SeqChunk(
            seq_id=request.seq_id,
            token_ids=request.token_at(chunk.start_pos, chunk.start_pos + chunk.num_tokens),
            start_pos=chunk.start_pos,
            new_block_ids=chunk.new_block_ids,
            sample=chunk.sample,
            output_index=len(request.output_ids),
        )
        if chunk.is_new:
            message.sampling.CopyFrom(
                shard_pb2.Sampling(
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k,
                    seed=params.seed,
                    logprobs=params.logprobs,
                )
            )
        chunks.append(message)
    return shard_pb2.StepRequest(step_id=plan.step_id, free_seq_ids=plan.free_seq_ids, chunks=chunks, num_steps=plan.num_steps)


class ReplicaClient:
    """Internal gRPC client of a replica's driver: a unix socket on one host, TCP (with mutual
    TLS when credentials are given) to a replica started elsewhere."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target = target
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=INTERNAL_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=INTERNAL_CHANNEL_OPTIONS)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)

    async def describe(self, timeout: float | None = None) -> shard_pb2.DescribeResponse:
        """The replica's model, tokenizer and KV cache (see DescribeResponse in shard.proto)."""
        return await self._stub.Describe(shard_pb2.DescribeRequest(), timeout=timeout, wait_for_ready=True)

    async def step(
        self, plan: StepPlan, timeout: float | None = None, metadata: tuple[tuple[str, str], ...] = (), report_timings: bool = False
    ) -> shard_pb2.StepResponse:
        """Runs a step; metadata may carry the step span's traceparent; report_timings asks for
        every rank's timings in the response."""
        message = plan_to_proto(plan)
        message.report_timings = report_timings
        return await self._stub.Step(message, timeout=timeout, metadata=metadata or None)

    async def embed(self, step_id: int, items: list[EmbedItem], timeout: float | None = None) -> shard_pb2.EmbedStepResponse:
        inputs = [
            shard_pb2.EmbedInput(
                token_ids=item.token_ids, block_ids=item.block_ids, pooling=_POOLING[item.pooling], normalize=item.normalize
            )
            for item in items
        ]
        return await self._stub.Embed(shard_pb2.EmbedStepRequest(step_id=step_id, inputs=inputs), timeout=timeout)

    async def heartbeat(self, timeout: float | None = None) -> shard_pb2.HeartbeatResponse:
        """Returns once every rank of the replica answered its driver (see Heartbeat in shard.proto)."""
        return await self._stub.Heartbeat(shard_pb2.HeartbeatRequest(), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()
