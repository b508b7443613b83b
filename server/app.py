"""Wires the gateway: start the replica, build the engine, serve gRPC until a signal.

Health (grpc.health.v1, for "" and shardgate.v1.Inference) says NOT_SERVING while the replica
loads and warms up, SERVING once it answers, and NOT_SERVING again while the server drains
(SIGINT/SIGTERM: in-flight calls get grace_s to finish) or once a replica process is lost (the
gateway then fails what is in flight with UNAVAILABLE and exits non-zero).
"""

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
from shardgate.server.embed_batcher import DynamicBatcher
from shardgate.server.engine import Engine
from shardgate.server.launcher import LocalReplica
from shardgate.server.replica import ReplicaClient
from shardgate.server.scheduler import Scheduler
from shardgate.server.service import InferenceService

log = logging.getLogger("shardgate.server")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


async def serve(config: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    """Runs the gateway until SIGINT or SIGTERM; `ready` is set once it accepts calls."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", config.max_message_bytes)])
    service = InferenceService(config)
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()

    replica = LocalReplica(config.replica, config.scheduler)
    client = ReplicaClient(replica.target)
    tasks: list[asyncio.Task] = []
    try:
        replica.start()
        info = await replica.wait_ready(client)
        tokenizer = Tokenizer.from_str(info.tokenizer_json)
        batcher = DynamicBatcher(config.embed, config.scheduler.priority_aging_s)
        scheduler = Scheduler(config.scheduler, BlockManager(info.num_kv_blocks, info.block_size))
        engine = Engine(scheduler, client, tokenizer, info.eos_token_ids, batcher)
        tasks.append(asyncio.create_task(engine.run(), name="engine"))
        tasks.append(asyncio.create_task(replica.wait_lost(), name="replica watch"))
        service.attach(engine, batcher, tokenizer, info)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d (kv cache: %d tokens)", info.model, config.host, port, info.kv_capacity_tokens)
        if ready is not None:
            ready.set()
        await _until_signal(tasks)
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_s)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.close()
        replica.stop()


async def _until_signal(tasks: list[asyncio.Task]) -> None:
    """Returns on SIGINT/SIGTERM; raises if a task (the engine loop, the replica watch) ends."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({stop_task, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    for task in tasks:
        if task.done():
            task.result()
            raise RuntimeError(f"the {task.get_name()} stopped")
