"""Deadlines and priorities on a server that runs one sequence at a time (so requests queue)."""

import re
import time

import grpc
import pytest
from servers import start_server, wait_until

from shardgate.clients import build_request
from shardgate.proto import inference_pb2


@pytest.fixture(scope="module")
def serial_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("logs"), "--max-num-seqs", "1", "--kv-cache-memory", str(64 << 20))
    yield server
    server.stop()


@pytest.fixture
def client(serial_server):
    with serial_server.client() as client:
        yield client
        # Every test leaves the server as it found it.
        wait_until(lambda: idle(client.server_status()), what="the server is idle")


@pytest.fixture
def stub(serial_server):
    with serial_server.raw_stub() as stub:
        yield stub


def idle(status) -> bool:
    replica = status.replicas[0]
    return (
        status.active_requests == 0
        and status.queued_requests == 0
        and replica.running_requests == 0
        and replica.free_kv_blocks == replica.total_kv_blocks
    )


def request(prompt: str, max_new_tokens: int, **fields) -> inference_pb2.GenerateRequest:
    return build_request(prompt, max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True, **fields)


def start_blocker(client, stub):
    """A long request holding the only sequence slot; cancel() it to let the queue move."""
    blocker = stub.Generate.future(request("blocker", 1800), timeout=300)
    wait_until(lambda: client.server_status().replicas[0].running_requests == 1, what="the blocker runs")
    return blocker


def test_deadline_shorter_than_the_queue_wait_never_reaches_a_shard(client, stub):
    blocker = start_blocker(client, stub)
    started = client.server_status().replicas[0].started_requests

    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as own_timeout:
        stub.Generate(request("queued", 8, timeout_ms=300), timeout=60)
    assert own_timeout.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert own_timeout.value.details().startswith("deadline exceeded while queued")
    with pytest.raises(grpc.RpcError) as grpc_deadline:
        list(stub.GenerateStream(request("queued too", 8), timeout=0.3))
    assert grpc_deadline.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 10  # answered at the deadline, not after the blocker

    wait_until(lambda: client.server_status().queued_requests == 0, what="the expired requests leave the queue")
    assert client.server_status().replicas[0].started_requests == started  # neither was ever scheduled
    blocker.cancel()


def test_deadline_mid_decode_ends_the_stream_after_its_tokens_and_frees_the_kv(client, stub):
    baseline = client.server_status().replicas[0]
    received = []
    with pytest.raises(grpc.RpcError) as raised:
        for message in stub.GenerateStream(request("decoding", 1800, timeout_ms=700), timeout=60):
            received.extend(message.token_ids)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    produced = int(re.fullmatch(r"deadline exceeded after (\d+) generated tokens", raised.value.details()).group(1))
    assert 0 < produced == len(received) < 1800  # everything produced was streamed before the status
    after = client.server_status()
    assert after.replicas[0].free_kv_blocks == baseline.free_kv_blocks == baseline.total_kv_blocks
    assert after.active_requests == 0 and after.replicas[0].running_requests == 0

    # The same through the call's gRPC deadline: the server cancels the request when the call ends.
    with pytest.raises(grpc.RpcError) as raised:
        for _ in stub.GenerateStream(request("decoding", 1800), timeout=0.7):
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: idle(client.server_status()), what="the KV blocks come back")


def test_priorities_reorder_the_queue(client, stub):
    blocker = start_blocker(client, stub)
    finished = []
    low = stub.Generate.future(request("low", 16, priority=0), timeout=300)
    low.add_done_callback(lambda _: finished.append("low"))
    wait_until(lambda: client.server_status().queued_requests == 1, what="the low priority request queues")
    high = stub.Generate.future(request("high", 16, priority=10), timeout=300)
    high.add_done_callback(lambda _: finished.append("high"))
    wait_until(lambda: client.server_status().queued_requests == 2, what="the high priority request queues")
    blocker.cancel()
    low_result, high_result = low.result(), high.result()
    assert finished == ["high", "low"]  # it arrived later and ran first
    assert low_result.usage.queue_time_s > high_result.usage.queue_time_s


def test_priority_outside_its_range_is_invalid(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(request("x", 4, priority=101), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and raised.value.details().startswith("priority: ")
