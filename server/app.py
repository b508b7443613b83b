"""Wires the gateway: start the replicas, build an engine per replica, serve gRPC until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tokenizers import Tokenizer

from shardgate.proto import inference_pb2, inference_pb2_grpc
from shardgate.server.block_manager import BlockManager
from shardgate.server.config import GatewayConfig
from shardgate.server.engine import Engine
from shardgate.server.interceptors import AuthInterceptor, HygieneInterceptor
from shardgate.server.launcher import LocalReplica
from shardgate.server.replica import ReplicaClient, ReplicaInfo
from shardgate.server.router import Router
from shardgate.server.scheduler import Scheduler
from shardgate.server.service import InferenceService

log = logging.getLogger("shardgate.server")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


# A client that vanishes without closing its connection is noticed by keepalive pings, and its
# streams are cancelled (freeing their KV blocks).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def build_server(config: GatewayConfig) -> tuple[grpc.aio.Server, int]:
    """The public gRPC server: interceptors, keepalive, and a TLS or plaintext port."""
    security = config.security
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if security.api_key_file:
        keys = [line.strip() for line in Path(security.api_key_file).read_bytes().decode().splitlines() if line.strip()]
        interceptors.append(AuthInterceptor(keys, exempt_services=[health.SERVICE_NAME]))
    interceptors.append(HygieneInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=KEEPALIVE_OPTIONS)
    address = f"{config.host}:{config.port}"
    if security.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(security.tls_key).read_bytes(), Path(security.tls_cert).read_bytes())],
            root_certificates=Path(security.tls_client_ca).read_bytes() if security.tls_client_ca else None,
            require_client_auth=security.tls_client_ca is not None,
        )
        return server, server.add_secure_port(address, credentials)
    return server, server.add_insecure_port(address)


def replica_credentials(config: GatewayConfig) -> grpc.ChannelCredentials | None:
    """Mutual-TLS credentials for remote replicas, when configured."""
    security = config.security
    if not security.replica_tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(security.replica_ca).read_bytes(),
        private_key=Path(security.replica_key).read_bytes(),
        certificate_chain=Path(security.replica_cert).read_bytes(),
    )


async def serve(config: GatewayConfig) -> None:
    """Runs the gateway until SIGINT or SIGTERM."""
    server, port = build_server(config)
    service = InferenceService(config)
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    await server.start()

    local = [LocalReplica(config.replica, index) for index in range(config.replicas)]
    remote_credentials = replica_credentials(config)
    clients = [ReplicaClient(r.target) for r in local] + [ReplicaClient(a, remote_credentials) for a in config.remote_replicas]
    engine_tasks: list[asyncio.Task] = []
    try:
        for replica in local:
            replica.start()
        infos = await asyncio.gather(*(_ready(client, replica, config) for client, replica in zip(clients, local + [None] * len(config.remote_replicas))))
        _check_same_model(infos, clients)
        tokenizer = Tokenizer.from_str(infos[0].tokenizer_json)
        engines = [
            Engine(index, Scheduler(config.scheduler, BlockManager(info.num_kv_blocks, info.block_size)), client, tokenizer, infos[0].eos_token_ids)
            for index, (client, info) in enumerate(zip(clients, infos))
        ]
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
