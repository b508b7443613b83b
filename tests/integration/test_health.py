"""grpc.health.v1 tells load balancers the truth: loading, serving, draining, replica lost."""

import os
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers import launch_server, start_server
from test_process_lifecycle import children_of

SERVICE = "shardgate.v1.Inference"
NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING


def watch(address: str, service: str = SERVICE):
    # Retry connecting every 50 ms, so the watch starts as soon as the port opens.
    options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 100)]
    channel = grpc.insecure_channel(address, options=options)
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True, timeout=180)
    return channel, call


def test_not_serving_until_warmup_ends_then_serving_then_not_serving_while_draining(tmp_path):
    server = launch_server(tmp_path, "--kv-cache-memory", str(16 << 20))
    try:
        channel, call = watch(server.address)
        statuses = iter(call)
        assert next(statuses).status == NOT_SERVING  # the port opens before the model loads
        assert next(statuses).status == SERVING
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == SERVING
        with server.client() as client:
            assert len(client.generate("warm", max_new_tokens=2, ignore_eos=True).token_ids) == 2
        server.process.send_signal(signal.SIGTERM)
        assert next(statuses).status == NOT_SERVING
        call.cancel()
        channel.close()
        assert server.process.wait(60) == 0
    finally:
        server.stop()


def test_not_serving_when_the_replica_is_lost(tmp_path):
    server = start_server(tmp_path, "--kv-cache-memory", str(16 << 20))
    try:
        channel, call = watch(server.address, service="")
        statuses = iter(call)
        assert next(statuses).status == SERVING
        [shard] = children_of(server.process.pid)
        os.kill(shard, signal.SIGKILL)
        assert next(statuses).status == NOT_SERVING
        call.cancel()
        channel.close()
        assert server.process.wait(60) == 1
        assert "replica 0 rank 0 exited" in server.log()
    finally:
        server.stop()
