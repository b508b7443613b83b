"""The gateway's handle on one replica: its session on the driver (Attach), its description
(shard.proto's DescribeResponse, kept as the message) and the Step, Embed and Heartbeat RPCs to
its driver. Every call carries the link's token (when the gateway has one) and the session's id.
The Attach call stays open for the session; a later message on it says that the driver is
stopping (SIGTERM), which watch_stopping() hands to the replica's engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from shardgate.proto import shard_pb2, shard_pb2_grpc
from shardgate.proto.common import INTERNAL_MESSAGE_BYTES
from shardgate.proto.link_auth import link_metadata
from shardgate.server.embed_batcher import Pooling
from shardgate.server.scheduler import StepPlan

log = logging.getLogger(__name__)
BUSY_RETRY_S = 0.5
"""How often the gateway asks again for a driver whose session another gateway holds."""
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
            token_ids=[] if chunk.last_sampled_input else request.token_at(chunk.start_pos, chunk.start_pos + chunk.num_tokens),
            start_pos=chunk.start_pos,
            new_block_ids=chunk.new_block_ids,
            sample=chunk.sample,
            output_index=chunk.output_index,
            last_sampled_input=chunk.last_sampled_input,
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
    return shard_pb2.StepRequest(
        step_id=plan.step_id, free_seq_ids=plan.free_seq_ids, chunks=chunks, num_steps=plan.num_steps, after_step_id=plan.after_step_id
    )


class ReplicaClient:
    """Internal gRPC client of a replica's driver: a unix socket on one host, TCP (with mutual
    TLS when credentials are given, and the shared token when there is one) to a replica
    started elsewhere. It holds the driver's one gateway session from the first describe() to
    close()."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None, token: str | None = None) -> None:
        self.target = target
        self._credentials = credentials
        self._token = token
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=INTERNAL_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=INTERNAL_CHANNEL_OPTIONS)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)
        self._session: str | None = None
        self._attach_call = None
        """The open Attach call: the session lasts while it does."""
        self._watch: asyncio.Task | None = None
        """Reads the Attach call's later messages: the driver's word that it is stopping."""
        self.stopping = False
        """The driver said it is stopping (it got SIGTERM): move its work elsewhere, then close()."""
        self._on_stopping: list[Callable[[], None]] = []

    def reconnected(self) -> ReplicaClient:
        """A new client of the same driver, with the same credentials and token (close this one first:
        the driver serves one session at a time)."""
        return ReplicaClient(self.target, self._credentials, self._token)

    def _metadata(self, extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
        return link_metadata(self._token, self._session) + extra

    async def _attach(self, timeout: float) -> None:
        """Opens the session, waiting (until timeout) while another gateway's session is open.
        Raises the call's AioRpcError (DEADLINE_EXCEEDED once timeout has passed)."""
        deadline = time.monotonic() + timeout
        said_busy = False
        while True:
            call = self._stub.Attach(shard_pb2.AttachRequest(), metadata=self._metadata(), wait_for_ready=True)
            try:
                response = await asyncio.wait_for(call.read(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                call.cancel()
                raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, f"no session on {self.target} in time") from None
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() + BUSY_RETRY_S > deadline:
                    raise
                if not said_busy:
                    log.warning("replica %s serves another gateway; waiting for that session to end (%s)", self.target, error.details())
                    said_busy = True
                await asyncio.sleep(BUSY_RETRY_S)
                continue
            if response is grpc.aio.EOF:
                raise _error(grpc.StatusCode.UNAVAILABLE, f"{self.target} ended the session at once (it is stopping)")
            self._attach_call, self._session = call, response.session_id
            self._watch = asyncio.create_task(self._watch_session(call), name=f"session of {self.target}")
            return

    async def _watch_session(self, call) -> None:
        """Waits for the driver's stopping notice on the open Attach call, until the call ends."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.stopping and not self.stopping:
                    log.warning("replica %s says it is stopping (its driver got SIGTERM)", self.target)
                    self.stopping = True
                    for callback in self._on_stopping:
                        callback()

    def watch_stopping(self, callback: Callable[[], None]) -> None:
        """Calls callback() once the driver says it is stopping (at once if it has said so)."""
        self._on_stopping.append(callback)
        if self.stopping:
            callback()

    async def describe(self, timeout: float | None = None) -> shard_pb2.DescribeResponse:
        """The replica's model, tokenizer and KV cache (see DescribeResponse in shard.proto);
        opens the session first, when this client has none."""
        if self._session is None:
            await self._attach(timeout if timeout is not None else float("inf"))
        return await self._stub.Describe(shard_pb2.DescribeRequest(), timeout=timeout, metadata=self._metadata(), wait_for_ready=True)

    async def step(
        self, plan: StepPlan, timeout: float | None = None, metadata: tuple[tuple[str, str], ...] = (), report_timings: bool = False
    ) -> shard_pb2.StepResponse:
        """Runs a step; metadata may carry the step span's traceparent; report_timings asks for
        every rank's timings in the response."""
        message = plan_to_proto(plan)
        message.report_timings = report_timings
        return await self._stub.Step(message, timeout=timeout, metadata=self._metadata(metadata))

    async def embed(self, step_id: int, items: list[EmbedItem], timeout: float | None = None) -> shard_pb2.EmbedStepResponse:
        inputs = [
            shard_pb2.EmbedInput(
                token_ids=item.token_ids, block_ids=item.block_ids, pooling=_POOLING[item.pooling], normalize=item.normalize
            )
            for item in items
        ]
        request = shard_pb2.EmbedStepRequest(step_id=step_id, inputs=inputs)
        return await self._stub.Embed(request, timeout=timeout, metadata=self._metadata())

    async def heartbeat(self, timeout: float | None = None) -> shard_pb2.HeartbeatResponse:
        """Returns once every rank of the replica answered its driver (see Heartbeat in shard.proto)."""
        return await self._stub.Heartbeat(shard_pb2.HeartbeatRequest(), timeout=timeout, metadata=self._metadata())

    async def close(self) -> None:
        """Ends the session (the driver is free for another gateway at once) and the channel."""
        if self._watch is not None:
            self._watch.cancel()
        await self._channel.close()


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error as the link's calls raise them, for what the client finds itself."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
