"""Wires the gateway: start the replicas, build an engine per replica, serve gRPC until a signal."""

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
from shardgate.server.replica import ReplicaClient, ReplicaInfo
from shardgate.server.router import Router
from shardgate.server.scheduler import Scheduler
from shardgate.server.service import InferenceService
from shardgate.server.telemetry import Telemetry

log = logging.getLogger("shardgate.server")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


async def serve(config: GatewayConfig) -> None:
    """Runs the gateway until SIGINT or SIGTERM."""
    telemetry = Telemetry.start(config.telemetry, config.host)
    server = grpc.aio.server(interceptors=telemetry.server_interceptors(SERVICE_NAME))
    service = InferenceService(config, telemetry)
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()

    local = [LocalReplica(config.replica, index) for index in range(config.replicas)]
    clients = [ReplicaClient(r.target) for r in local] + [ReplicaClient(address) for address in config.remote_replicas]
    engine_tasks: list[asyncio.Task] = []
    try:
        for replica in local:
            replica.start()
        infos = await asyncio.gather(*(_ready(client, replica, config) for client, replica in zip(clients, local + [None] * len(config.remote_replicas))))
        _check_same_model(infos, clients)
        tokenizer = Tokenizer.from_str(infos[0].tokenizer_json)
        engines = [
            Engine(
                index, Scheduler(config.scheduler, BlockManager(info.num_kv_blocks, info.block_size)), client, tokenizer,
                infos[0].eos_token_ids, telemetry.replica(index, len(info.devices)),
            )  # fmt: skip
            for index, (client, info) in enumerate(zip(clients, infos))
        ]
        telemetry.attach(infos[0].model, [engine.scheduler for engine in engines])
        engine_tasks = [asyncio.create_task(engine.run(), name=f"engine-{engine.index}") for engine in engines]
        service.attach(Router(engines), tokenizer, infos)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s:%d: %d replica(s) of tp %d × pp %d",
            infos[0].model, config.host, port, len(engines), infos[0].tp, infos[0].pp,
        )  # fmt: skip
        await _until_signal(engine_tasks)
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_s)
        for task in engine_tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in clients:
            await client.close()
        for replica in local:
            replica.stop()
        telemetry.close()


async def _ready(client: ReplicaClient, replica: LocalReplica | None, config: GatewayConfig) -> ReplicaInfo:
    """Waits for a replica's driver: a local one while its processes live, a remote one until
    the start timeout."""
    if replica is not None:
        return await replica.wait_ready(client)
    try:
        return await client.describe(timeout=config.replica.start_timeout_s)
    except grpc.aio.AioRpcError as error:
        raise RuntimeError(f"remote replica {client.target} did not answer: {error.code().name}") from None


def _check_same_model(infos: list[ReplicaInfo], clients: list[ReplicaClient]) -> None:
    first = infos[0]
    for info, client in zip(infos[1:], clients[1:]):
        if (info.model, info.vocab_size, info.tokenizer_json) != (first.model, first.vocab_size, first.tokenizer_json):
            raise RuntimeError(f"replica {client.target} serves {info.model}, not {first.model}")


async def _until_signal(engine_tasks: list[asyncio.Task]) -> None:
    """Returns on SIGINT/SIGTERM; raises if an engine loop dies."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({stop_task, *engine_tasks}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    for task in engine_tasks:
        if task.done():
            task.result()
            raise RuntimeError(f"{task.get_name()} stopped")
