"""grpc.health.v1 tells load balancers the truth: loading, serving, draining, replica lost."""

import os
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import children_of
from servers import launch_server, start_server

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


def test_not_serving_only_while_no_replica_can_serve(tmp_path):
    server = start_server(tmp_path, "--kv-cache-memory", str(16 << 20), "--restart-backoff", "0.2")
    try:
        channel, call = watch(server.address, service="")
        statuses = iter(call)
        assert next(statuses).status == SERVING
        [shard] = children_of(server.process.pid)
        os.kill(shard, signal.SIGKILL)
        assert next(statuses).status == NOT_SERVING  # the only replica is down
        assert next(statuses).status == SERVING  # restarted
        call.cancel()
        channel.close()
        with server.client() as client:
            assert len(client.generate("back", max_new_tokens=2, ignore_eos=True).token_ids) == 2
        assert "replica 0 rank 0 exited" in server.log() and "replica 0 is serving again" in server.log()
    finally:
        server.stop()


def test_two_replicas_one_down_stays_serving(tmp_path):
    server = start_server(tmp_path, "--replicas", "2", "--kv-cache-memory", str(16 << 20), "--restart-backoff", "5")
    try:
        channel, call = watch(server.address, service="")
        statuses = iter(call)
        assert next(statuses).status == SERVING
        os.kill(children_of(server.process.pid)[0], signal.SIGKILL)
        with server.client() as client:
            for _ in range(3):  # served by the other replica while the first waits to restart
                assert len(client.generate("still", max_new_tokens=2, ignore_eos=True).token_ids) == 2
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == SERVING
        call.cancel()
        channel.close()
    finally:
        server.stop()
