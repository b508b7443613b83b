"""Backpressure end to end: a GenerateBidi client that sends many requests and reads nothing.

With --max-concurrent-requests 64, at most 64 of its requests are admitted at a time and later
ones are refused RESOURCE_EXHAUSTED; the stream's undelivered output stops at its bound
(--max-undelivered-tokens), so its requests stop getting decode steps (only the first 64 ever
start) and the gateway's memory stays flat; other clients' calls are answered throughout; past
--stream-stall-timeout the stalled requests end DEADLINE_EXCEEDED, their KV blocks and
admission slots come back, and other clients generate again while the stalled stream is still open.
"""

import time

import grpc
import psutil
import pytest
from servers import start_server, wait_until

from shardgate.clients import build_request
from shardgate.proto import inference_pb2, inference_pb2_grpc

STALL_TIMEOUT_S = 15  # long enough for 64 requests to be admitted on a loaded 2-core machine
MAX_CONCURRENT = 64
UNDELIVERED_TOKENS = 256
REQUESTS = 1200
STREAMS_PER_CONNECTION = 8
STALLED_OPTIONS = [("grpc.http2.bdp_probe", 0)]
"""The stalled client's receive window stays at HTTP/2's 64 kB, well below what its requests would make."""
RSS_GROWTH_BOUND = 16 << 20
"""The stalled stream may grow the gateway by at most this: 64 admitted requests' state, at most
256 undelivered tokens and error messages (well under 1 MB; +1.0 MiB measured), and allocator slack."""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flags = ("--max-concurrent-requests", str(MAX_CONCURRENT), "--stream-stall-timeout", str(STALL_TIMEOUT_S))
    flags += ("--max-undelivered-tokens", str(UNDELIVERED_TOKENS), "--kv-cache-memory", str(8 << 20), "--max-num-seqs", "64")
    flags += ("--max-concurrent-streams", str(STREAMS_PER_CONNECTION))
    running = start_server(tmp_path_factory.mktemp("backpressure"), *flags)
    yield running
    running.stop()


def requests():
    for index in range(REQUESTS):
        request = build_request(f"stalled request {index}", request_id=f"s{index}", max_new_tokens=200, temperature=0, ignore_eos=True)
        yield inference_pb2.GenerateBidiRequest(generate=request)


def test_a_stream_that_never_reads_is_held_to_its_bounds_and_ends_after_the_stall_timeout(server):
    gateway = psutil.Process(server.process.pid)
    with server.client(timeout=60) as client, server.raw_stub() as stub, grpc.insecure_channel(server.address, STALLED_OPTIONS) as stalled:
        client.generate("warm up", max_new_tokens=4)
        baseline = client.server_status()
        [replica] = baseline.replicas
        rss_before = gateway.memory_info().rss
        call = inference_pb2_grpc.InferenceStub(stalled).GenerateBidi(requests(), timeout=300)  # not read until the end
        try:
            wait_until(lambda: client.server_status().active_requests == MAX_CONCURRENT, what="64 requests admitted")
            stalled_at = time.monotonic()

            # Held: no decode steps for requests whose stream is over its bound, no more starts. All
            # 64 are at the replica; how many got their first step before the stream went over its
            # bound (256 undelivered tokens) depends on how fast they arrived.
            def at_the_replica() -> bool:
                replica_status = client.server_status().replicas[0]
                return replica_status.running_requests + replica_status.waiting_requests == MAX_CONCURRENT

            wait_until(at_the_replica, what="64 at the replica")
            samples, answers = [], []
            while time.monotonic() - stalled_at < STALL_TIMEOUT_S - 2:
                began = time.monotonic()
                status = client.server_status()
                samples.append((status.active_requests, status.replicas[0].started_requests, gateway.memory_info().rss))
                try:
                    stub.Generate(build_request("another client", max_new_tokens=4), timeout=10)
                    answers.append(("OK", time.monotonic() - began))
                except grpc.RpcError as error:  # every slot is the stalled stream's
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests" in error.details()
                    answers.append((error.code().name, time.monotonic() - began))
                time.sleep(0.2)
            assert all(active <= MAX_CONCURRENT for active, _, _ in samples)
            # Only the 64 admitted ever start (some may start late, as the client's receive window
            # takes a few messages); the warm-up is the one more.
            assert max(count for _, count, _ in samples) - replica.started_requests <= MAX_CONCURRENT + 1
            assert max(rss for _, _, rss in samples) - rss_before < RSS_GROWTH_BOUND
            assert max(seconds for _, seconds in answers) < 2.0, answers  # answered at once, never left hanging

            # Past the stall timeout: the stalled requests end, their blocks and slots come back.
            def recovered() -> bool:
                status = client.server_status()
                return status.active_requests == 0 and status.replicas[0].free_kv_blocks == replica.total_kv_blocks

            wait_until(recovered, timeout=STALL_TIMEOUT_S + 20, what="KV blocks and admission back to baseline")
            assert client.server_status().replicas[0].free_kv_blocks == baseline.replicas[0].free_kv_blocks
            started = client.server_status().replicas[0].started_requests
            assert started - replica.started_requests <= MAX_CONCURRENT + 1
            # while the stalled stream is open
            served = client.generate("another client after the stall", max_new_tokens=8, ignore_eos=True)
            assert len(served.token_ids) == 8
            assert client.server_status().replicas[0].started_requests == started + 1  # the stalled stream read no new request

            # What the stalled client finds when it finally reads: refusals, then stall ends saying why.
            errors = []
            for response in call:
                if response.WhichOneof("event") == "error":
                    errors.append(response.error)
                    if "--stream-stall-timeout" in response.error.message:
                        break
            assert any(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "max_concurrent_requests" in e.message for e in errors)
            stall = errors[-1]
            assert stall.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert "read none of this stream's output" in stall.message and "KV cache was freed" in stall.message
        finally:
            call.cancel()
        wait_until(lambda: client.server_status().active_requests == 0, what="the cancelled stream's requests ended")


def test_a_slow_reader_gets_every_token_in_order(server):
    """Held back and resumed as it reads: a stream reading slowly loses nothing."""
    with server.client(timeout=60) as client, server.raw_stub() as stub:
        expected = client.generate("slow reader", max_new_tokens=300, temperature=0, ignore_eos=True)
        tokens = []
        request = build_request("slow reader", max_new_tokens=300, temperature=0, ignore_eos=True)
        for response in stub.GenerateStream(request, timeout=120):
            if not tokens:
                time.sleep(2)  # the stream reaches its bound and is held back, then resumes as it is read
            tokens += response.token_ids
        assert tokens == list(expected.token_ids)


def test_a_connection_gets_at_most_max_concurrent_streams_calls_at_a_time(server):
    long = build_request("long", max_new_tokens=2000, ignore_eos=True)
    with server.client(timeout=60) as client, server.raw_stub() as stub:
        calls = [stub.GenerateStream(long, timeout=120) for _ in range(STREAMS_PER_CONNECTION)]
        try:
            for call in calls:
                next(call)
            extra = stub.GenerateStream(long, timeout=120)  # waits on the connection for a free stream
            time.sleep(1)
            assert client.server_status().active_requests == STREAMS_PER_CONNECTION
            assert len(client.generate("another connection", max_new_tokens=4, ignore_eos=True).token_ids) == 4
            calls.pop().cancel()
            next(extra)  # a stream came free: the waiting call starts
            calls.append(extra)
        finally:
            for call in calls:
                call.cancel()
        wait_until(lambda: client.server_status().active_requests == 0, what="the calls ended")
