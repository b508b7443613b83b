"""Wires the gateway: start the replica, build the engine, serve gRPC until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tokenizers import Tokenizer

from shardgate.proto import inference_pb2, inference_pb2_grpc
from shardgate.server.block_manager import BlockManager
from shardgate.server.config import GatewayConfig
from shardgate.server.engine import Engine
from shardgate.server.launcher import LocalReplica
from shardgate.server.replica import ReplicaClient
from shardgate.server.scheduler import Scheduler
from shardgate.server.service import InferenceService

log = logging.getLogger("shardgate.server")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


async def serve(config: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    """Runs the gateway until SIGINT or SIGTERM; `ready` is set once it accepts calls."""
    server = grpc.aio.server()
    service = InferenceService(config)
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()

    replica = LocalReplica(config.replica)
    client = ReplicaClient(replica.target)
    engine_task = None
    try:
        replica.start()
        info = await replica.wait_ready(client)
        tokenizer = Tokenizer.from_str(info.tokenizer_json)
        engine = Engine(Scheduler(config.scheduler, BlockManager(info.num_kv_blocks, info.block_size)), client, tokenizer, info.eos_token_ids)
        engine_task = asyncio.create_task(engine.run(), name="engine")
        service.attach(engine, tokenizer, info)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d (kv cache: %d tokens)", info.model, config.host, port, info.kv_capacity_tokens)
        if ready is not None:
            ready.set()
        await _until_signal(engine_task)
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_s)
        if engine_task is not None:
            engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await engine_task
        await client.close()
        replica.stop()


async def _until_signal(engine_task: asyncio.Task) -> None:
    """Returns on SIGINT/SIGTERM; raises if the engine loop dies."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({stop_task, engine_task}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    if engine_task.done():
        engine_task.result()
        raise RuntimeError("the engine loop stopped")
