"""Fakes of the replica client (server/replicas/client.py) for driving engines without shards:
scripted tokens for steps, and embedding vectors that are easy to check."""

import asyncio
import struct

import grpc

from shardgate.proto import shard_pb2


class ScriptedReplica:
    """Answers each step with the next token of each sequence's script (by request prompt)."""

    def __init__(self, scripts: dict[int, list[int]], fail_at_step: int | None = None) -> None:
        self.scripts = scripts
        self.fail_at_step = fail_at_step
        self.plans = []
        self.metadata = []
        self._on_stopping = []

    def watch_stopping(self, callback) -> None:
        self._on_stopping.append(callback)

    def announce_stopping(self) -> None:
        """What the client does when the driver's Attach call says it is stopping (SIGTERM)."""
        for callback in self._on_stopping:
            callback()

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        self.plans.append(plan)
        self.metadata.append(metadata)
        await asyncio.sleep(0)
        if plan.step_id == self.fail_at_step:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, details="shard died")
        tokens = []
        for step in range(plan.num_steps):  # step-major, as the shard answers a multi-step plan
            for chunk in plan.chunks:
                if chunk.sample:
                    script = self.scripts[chunk.request.prompt_ids[0]]
                    index = chunk.output_index + step
                    tokens.append(shard_pb2.SampledToken(seq_id=chunk.request.seq_id, token_id=script[index % len(script)]))
        return shard_pb2.StepResponse(tokens=tokens)


class EmbeddingReplica(ScriptedReplica):
    """Also answers embedding batches: each input's vector is [its token count, its token sum]."""

    def __init__(self, scripts=None):
        super().__init__(scripts or {})
        self.batches = []  # in order: ("step",) or ("embed", each input's token ids, each input's lent blocks)

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        self.batches.append(("step",))
        return await super().step(plan)

    async def embed(self, step_id, items, timeout=None):
        self.batches.append(("embed", [list(i.token_ids) for i in items], [list(i.block_ids) for i in items]))
        await asyncio.sleep(0)
        vectors = b"".join(struct.pack("<2f", len(i.token_ids), sum(i.token_ids)) for i in items)
        return shard_pb2.EmbedStepResponse(vectors=vectors, hidden_size=2)
