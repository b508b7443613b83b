"""Wires the gateway: start the replicas, build an engine per replica, serve gRPC (and, with
--http-port, the OpenAI-compatible HTTP API on the same loop: server/openai/) until a signal.

The KServe v2 service (kserve_service.py) shares the port, interceptors and engine API with
the native one. Health (grpc.health.v1, for "", shardgate.v1.Inference and
inference.GRPCInferenceService) says NOT_SERVING while the replicas
load and warm up, SERVING once they answer, and NOT_SERVING again while the server drains
(SIGINT/SIGTERM: new calls get UNAVAILABLE, in-flight ones get --drain-timeout to finish) or
while no replica can serve (each failed replica is restarted by its supervisor; see
supervisor.py).
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

from shardgate.proto import inference_pb2, inference_pb2_grpc, kserve_v2_pb2, kserve_v2_pb2_grpc, shard_pb2
from shardgate.proto.link_auth import read_token
from shardgate.proto.secret_files import read_secret_lines
from shardgate.proto.shard_config import BatchLimits
from shardgate.proto.tls import channel_credentials, server_credentials
from shardgate.server import event_loop
from shardgate.server.block_manager import BlockManager
from shardgate.server.config import GatewayConfig
from shardgate.server.embed_batcher import DynamicBatcher
from shardgate.server.engine import Engine
from shardgate.server.engine_api import EngineAPI
from shardgate.server.interceptors import AuthInterceptor, HygieneInterceptor
from shardgate.server.kserve_service import KServeService
from shardgate.server.openai.app import HttpServer
from shardgate.server.replicas.client import ReplicaClient
from shardgate.server.replicas.launcher import LocalReplica, remove_stale_folders
from shardgate.server.replicas.supervisor import ReplicaSupervisor
from shardgate.server.scheduler import Scheduler
from shardgate.server.service import InferenceService
from shardgate.server.telemetry import Telemetry
from shardgate.server.tenancy import ApiKeys

log = logging.getLogger("shardgate.server")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
KSERVE_SERVICE_NAME = kserve_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


# A client that vanishes without closing its connection is noticed by keepalive pings, and its
# streams are cancelled (freeing their KV blocks).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def build_server(config: GatewayConfig, tracing: list[grpc.aio.ServerInterceptor], keys: ApiKeys | None) -> tuple[grpc.aio.Server, int]:
    """The public gRPC server: interceptors (tracing outermost, then auth with `keys`, then
    hygiene), keepalive, and a TLS or plaintext port."""
    security = config.security
    interceptors: list[grpc.aio.ServerInterceptor] = list(tracing)
    if keys is not None:
        interceptors.append(AuthInterceptor(keys, exempt_services=[health.SERVICE_NAME]))
    interceptors.append(HygieneInterceptor())
    options = [
        *KEEPALIVE_OPTIONS,
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.streams.max_concurrent_streams),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    address = f"{config.host}:{config.port}"
    if security.tls_cert:
        credentials = server_credentials(security.tls_cert, security.tls_key, security.tls_client_ca)
        return server, server.add_secure_port(address, credentials)
    return server, server.add_insecure_port(address)


def remote_replica_clients(config: GatewayConfig) -> list[ReplicaClient]:
    """Clients of the remote replicas' drivers: mutual TLS and the shared token, when configured."""
    security = config.security
    credentials = channel_credentials(security.replica_ca, security.replica_key, security.replica_cert) if security.replica_tls else None
    token = read_token(security.replica_token_file, "--replica-token-file") if security.replica_token_file else None
    return [ReplicaClient(address, credentials, token) for address in config.remote_replicas]


async def serve(config: GatewayConfig) -> None:
    """Runs the gateway until SIGINT or SIGTERM, then drains."""
    telemetry = Telemetry.start(config.telemetry, config.host)
    tracing = telemetry.server_interceptors(SERVICE_NAME, KSERVE_SERVICE_NAME)
    # One ApiKeys for every frontend, so that a key is the same tenant (quota, prefix cache) on each.
    keys = ApiKeys(read_secret_lines(config.security.api_key_file, "--api-key-file")) if config.security.api_key_file else None
    server, port = build_server(config, tracing, keys)
    api = EngineAPI(config, telemetry)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(api), server)
    kserve_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeService(api), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await _set_health(health_servicer, serving=False)
    reflection.enable_server_reflection((SERVICE_NAME, KSERVE_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    await server.start()
    http = HttpServer.start(api, config, keys) if config.http.port is not None else None
    if http is not None:
        log.info("OpenAI-compatible HTTP API on %s:%d", config.host, http.port)

    if config.replicas:
        await asyncio.to_thread(remove_stale_folders)
    local = [
        LocalReplica(config.replica, config.scheduler, index, log_format=config.telemetry.log_format) for index in range(config.replicas)
    ]
    clients = [ReplicaClient(r.target) for r in local] + remote_replica_clients(config)
    supervisors: list[ReplicaSupervisor] = []
    tasks: list[asyncio.Task] = []
    try:
        for replica in local:
            replica.start()
        descriptions = await asyncio.gather(
            *(_ready(client, replica, config) for client, replica in zip(clients, local + [None] * len(config.remote_replicas)))
        )
        _check_same_model(descriptions, clients)
        _check_limits(descriptions, clients, config)
        tokenizer = Tokenizer.from_str(descriptions[0].tokenizer_json)
        batcher = DynamicBatcher(config.embed, config.scheduler.priority_aging_s)
        engines = [
            Engine(
                index,
                Scheduler(config.scheduler, BlockManager(info.num_kv_blocks, info.block_size)),
                client,
                tokenizer,
                descriptions[0].model.eos_token_ids,
                batcher,
                config.supervision,
                telemetry.replica(index, len(info.model.devices)),
                config.streams.stall_timeout_s,
            )
            for index, (client, info) in enumerate(zip(clients, descriptions))
        ]

        async def health_follows_replicas() -> None:
            if not api.draining:  # while draining, health stays NOT_SERVING
                await _set_health(health_servicer, serving=api.serving)

        supervisors = [
            ReplicaSupervisor(engine, config, health_follows_replicas, local[engine.index] if engine.index < len(local) else None)
            for engine in engines
        ]
        api.attach(engines, batcher, tokenizer, descriptions, supervisors)
        telemetry.attach(descriptions[0].model.model, api.replicas)
        tasks = [asyncio.create_task(engine.run(), name=f"engine {engine.index}") for engine in engines]
        tasks += [asyncio.create_task(s.run(), name=f"replica {s.engine.index} supervisor") for s in supervisors]
        await _set_health(health_servicer, serving=True)
        log.info(
            "serving %s on %s:%d: %d replica(s) of tp %d × pp %d (event loop: %s)",
            descriptions[0].model.model,
            config.host,
            port,
            len(engines),
            descriptions[0].model.tp,
            descriptions[0].model.pp,
            event_loop.name(),
        )
        await _until_signal(tasks[: len(engines)])
        await _drain(api, health_servicer, config.drain_timeout_s)
    finally:
        await health_servicer.enter_graceful_shutdown()
        if http is not None:
            await http.stop()
        await server.stop(1.0)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if supervisors:
            await asyncio.gather(*(s.stop() for s in supervisors))
        else:
            for client in clients:
                await client.close()
            for replica in local:
                replica.stop()
        api.close()
        telemetry.close()


async def _set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME, KSERVE_SERVICE_NAME):
        await health_servicer.set(name, status)


async def _drain(api: EngineAPI, health_servicer, timeout_s: float) -> None:
    """Health NOT_SERVING and new calls UNAVAILABLE at once; in-flight requests get timeout_s to
    finish, then end with finish reason `cancelled`."""
    api.drain()
    await health_servicer.enter_graceful_shutdown()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while api.in_flight() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    api.abort_all()
    log.info("drained (%d calls were still in flight)", api.in_flight())


async def _ready(client: ReplicaClient, replica: LocalReplica | None, config: GatewayConfig) -> shard_pb2.DescribeResponse:
    """Waits for a replica's driver: a local one while its processes live, a remote one until
    the start timeout."""
    if replica is not None:
        return await replica.wait_ready(client)
    try:
        return await client.describe(timeout=config.replica.start_timeout_s)
    except grpc.aio.AioRpcError as error:
        raise RuntimeError(f"remote replica {client.target} did not answer: {error.code().name} ({error.details()})") from None


def _check_same_model(descriptions: list[shard_pb2.DescribeResponse], clients: list[ReplicaClient]) -> None:
    first = descriptions[0]
    for info, client in zip(descriptions[1:], clients[1:]):
        if (info.model.model, info.model.vocab_size, info.tokenizer_json) != (
            first.model.model,
            first.model.vocab_size,
            first.tokenizer_json,
        ):
            raise RuntimeError(f"replica {client.target} serves {info.model.model}, not {first.model.model}")


def _check_limits(descriptions: list[shard_pb2.DescribeResponse], clients: list[ReplicaClient], config: GatewayConfig) -> None:
    """A driver refuses steps above the limits it was started with (and profiled its memory at):
    the gateway's own must fit each replica's."""
    for info, client in zip(descriptions, clients):
        if over := BatchLimits.from_message(info.limits).exceeded_by(config.scheduler):
            raise RuntimeError(
                f"replica {client.target} takes smaller steps than this gateway plans ({', '.join(over)}): start its driver "
                "with limits as large as the gateway's (--max-batch-tokens, --max-num-seqs, --decode-steps), or lower the gateway's"
            )


async def _until_signal(tasks: list[asyncio.Task]) -> None:
    """Returns on SIGINT/SIGTERM; raises if an engine loop ends."""
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
