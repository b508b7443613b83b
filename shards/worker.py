"""The driver's gRPC service: the gateway's only door into the replica."""

from __future__ import annotations

import grpc

from shardgate.proto import shard_pb2, shard_pb2_grpc
from shardgate.server.otel import context_from_metadata
from shardgate.shards.executor import StepExecutor


class ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(self, executor: StepExecutor, description: shard_pb2.DescribeResponse) -> None:
        self.executor = executor
        self.description = description

    def Describe(self, request, context) -> shard_pb2.DescribeResponse:
        return self.description

    def Step(self, request: shard_pb2.StepRequest, context) -> shard_pb2.StepResponse:
        # The gateway's step span, when it traces this step and this process exports spans.
        parent = context_from_metadata(context.invocation_metadata()) if self.executor.tracer is not None else None
        try:
            return self.executor.run(request, parent)
        except ValueError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))

    def Embed(self, request: shard_pb2.EmbedStepRequest, context) -> shard_pb2.EmbedStepResponse:
        try:
            return self.executor.embed(request)
        except ValueError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
