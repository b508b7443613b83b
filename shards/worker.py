"""The driver's gRPC service: the gateway's only door into the replica."""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import grpc

from shardgate.proto import shard_pb2, shard_pb2_grpc
from shardgate.proto.tracing import context_from_metadata
from shardgate.shards.executor import StepExecutor

T = TypeVar("T")


class MainThread:
    """Runs the model's work on the process's main thread, which gRPC's handler threads hand it
    to: the thread that loaded and warmed up the model, whose OpenMP team torch's intra-op
    parallelism uses. (Run on a gRPC handler thread, the bench model's steps took ~1.3× as
    long on CPU, at ~1.3 cores busy instead of 2.)"""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()

    def call(self, function: Callable[..., T], *args) -> T:
        """Runs function(*args) on the main thread; returns its result or raises its exception."""
        future: Future = Future()
        self._calls.put((function, args, future))
        return future.result()

    def serve(self) -> None:
        """The main thread: run calls until stop()."""
        while (item := self._calls.get()) is not None:
            function, args, future = item
            try:
                future.set_result(function(*args))
            except BaseException as error:  # handed to the caller, which raises it
                future.set_exception(error)

    def stop(self) -> None:
        self._calls.put(None)


class ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(self, executor: StepExecutor, description: shard_pb2.DescribeResponse, main_thread: MainThread) -> None:
        self.executor = executor
        self.description = description
        self.main_thread = main_thread

    def Describe(self, request, context) -> shard_pb2.DescribeResponse:
        return self.description

    def Step(self, request: shard_pb2.StepRequest, context) -> shard_pb2.StepResponse:
        # The gateway's step span, when it traces this step and this process exports spans.
        parent = context_from_metadata(context.invocation_metadata()) if self.executor.tracer is not None else None
        try:
            return self.main_thread.call(self.executor.run, request, parent)
        except ValueError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))

    def Embed(self, request: shard_pb2.EmbedStepRequest, context) -> shard_pb2.EmbedStepResponse:
        try:
            return self.main_thread.call(self.executor.embed, request)
        except ValueError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
