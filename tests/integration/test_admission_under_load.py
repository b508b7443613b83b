"""Admission bounds on a busy server: over a bound, RESOURCE_EXHAUSTED at once naming it, while
every accepted request completes."""

import time

import grpc
import pytest
from servers import start_server, wait_until

from shardgate.clients import build_request
from shardgate.proto import inference_pb2

LATENCY_BOUND_S = 0.2
"""A refusal takes a round trip (a few ms on a quiet host), never a wait behind the work: the
accepted requests run for seconds. With async scheduling the replica keeps the host's cores busy
between steps too, so the test client's own threads may wait tens of ms for a core."""


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory):
    """One sequence runs at a time, so the next ones queue: at most 2 requests and 400 tokens."""
    flags = ["--max-num-seqs", "1", "--max-queue-requests", "2", "--max-queue-tokens", "400", "--kv-cache-memory", str(64 << 20)]
    server = start_server(tmp_path_factory.mktemp("logs"), *flags)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def concurrency_server(tmp_path_factory):
    flags = ["--max-num-seqs", "4", "--max-concurrent-requests", "3", "--kv-cache-memory", str(64 << 20)]
    server = start_server(tmp_path_factory.mktemp("logs"), *flags)
    yield server
    server.stop()


def request(prompt: str, max_new_tokens: int) -> inference_pb2.GenerateRequest:
    return build_request(prompt, max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)


def refused(stub, message: inference_pb2.GenerateRequest, bound: str) -> float:
    """Sends a request that must be refused naming `bound`; returns how long the refusal took."""
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(message, timeout=10)
    elapsed = time.perf_counter() - start
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
    assert raised.value.details().startswith(f"{bound}: ") and "--" + bound.replace("_", "-") in raised.value.details()
    return elapsed


def test_queue_bounds_refuse_at_once_while_accepted_requests_complete(queue_server):
    with queue_server.client() as client, queue_server.raw_stub() as stub:  # raw_stub connects before anything is timed
        blocker = stub.Generate.future(request("blocker", 600), timeout=300)
        wait_until(lambda: client.server_status().replicas[0].running_requests == 1, what="the blocker runs")
        long_queued = stub.Generate.future(request("x" * 299, 8), timeout=300)  # 300 tokens with BOS
        wait_until(lambda: client.server_status().queued_tokens == 300, what="the first request queues")
        refused(stub, request("y" * 199, 8), "max_queue_tokens")  # 300 + 200 > 400
        short_queued = stub.Generate.future(request("short", 8), timeout=300)
        wait_until(lambda: client.server_status().queued_requests == 2, what="the second request queues")

        latencies = [refused(stub, request(f"over {i}", 8), "max_queue_requests") for i in range(5)]
        status = client.server_status()
        assert status.replicas[0].running_requests == 1 and status.queued_requests == 2  # the bound was really in force

        results = [f.result() for f in (blocker, long_queued, short_queued)]
    assert [len(r.token_ids) for r in results] == [600, 8, 8]
    assert all(r.finish_reason == inference_pb2.FINISH_REASON_LENGTH for r in results)
    assert max(latencies) < LATENCY_BOUND_S, latencies


def test_concurrency_bound_refuses_at_once_while_accepted_requests_complete(concurrency_server):
    with concurrency_server.client() as client, concurrency_server.raw_stub() as stub:
        accepted = [stub.Generate.future(request(f"accepted {i}", 300), timeout=300) for i in range(3)]
        wait_until(lambda: client.server_status().replicas[0].running_requests == 3, what="three requests run")

        latencies = [refused(stub, request(f"over {i}", 8), "max_concurrent_requests") for i in range(5)]
        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(inference_pb2.EmbedRequest(inputs=["embed too"]), timeout=10)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        over_bidi = inference_pb2.GenerateBidiRequest(generate=build_request("bidi", max_new_tokens=4, request_id="b1"))
        [response] = list(stub.GenerateBidi(iter([over_bidi]), timeout=10))
        assert response.error.request_id == "b1" and response.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert response.error.message.startswith("max_concurrent_requests: ")

        results = [f.result() for f in accepted]
        assert client.server_status().active_requests == 0
    assert all(len(r.token_ids) == 300 for r in results)
    assert max(latencies) < LATENCY_BOUND_S, latencies
