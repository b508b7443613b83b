"""Failures are noticed fast and handled within bounds: an idle replica's stopped rank is found
by the heartbeat with no request running, and a request that brings down every replica it runs
on is retried once, then ends UNAVAILABLE, while the replicas come back and serve others."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from servers import start_server, wait_until
from test_supervision import rank_pid

from shardgate.proto import inference_pb2

KV = str(16 << 20)


def poison(server, prompt: str):
    """A Generate call on a raw stub: the client library's retries would send the poison again."""
    with server.raw_stub() as stub:
        return stub.Generate(inference_pb2.GenerateRequest(prompt=prompt, max_new_tokens=4), timeout=60)


def replica_states(client) -> list[tuple[bool, int]]:
    return [(replica.healthy, replica.restarts) for replica in client.server_status(timeout=10).replicas]


def test_an_idle_replica_whose_rank_stops_is_noticed_by_its_heartbeat_and_restarted(tmp_path):
    server = start_server(tmp_path, "--tp", "2", "--kv-cache-memory", KV, "--restart-backoff", "0.2")
    stopped = None
    try:
        with server.client() as client:
            assert client.generate("warm", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
            time.sleep(3)  # idle: heartbeats go on
            assert replica_states(client) == [(True, 0)]
            stopped = rank_pid(server.process.pid, 0, 1)
            os.kill(stopped, signal.SIGSTOP)
            stopped_at = time.monotonic()
            wait_until(lambda: not replica_states(client)[0][0], timeout=30, what="the replica counted as failed")
            noticed_s = time.monotonic() - stopped_at
            wait_until(lambda: replica_states(client) == [(True, 1)], timeout=90, what="the replica restarted")
            assert client.generate("after", max_new_tokens=3, ignore_eos=True).usage.completion_tokens == 3
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.stop()
    print(f"idle replica's stopped rank noticed after {noticed_s:.2f} s")
    # a heartbeat every 2 s (--heartbeat-interval), answered within 8 s (--step-timeout-floor)
    assert noticed_s < 2 + 8 + 2, noticed_s
    assert "heartbeat: DEADLINE_EXCEEDED" in server.log()


def test_collectives_between_ranks_time_out_in_seconds_and_an_idle_driver_keeps_its_ranks_waiting_within_it(tmp_path):
    # no gateway heartbeat: only the driver's own keepalive and the collective timeout are at work
    flags = ("--tp", "2", "--kv-cache-memory", KV, "--restart-backoff", "0.2", "--heartbeat-interval", "0", "--collective-timeout", "3")
    server = start_server(tmp_path, *flags)
    stopped = None
    try:
        with server.client() as client:
            time.sleep(8)  # idle for longer than the collective timeout: rank 1 waits in a broadcast all along
            assert replica_states(client) == [(True, 0)]
            assert client.generate("after idling", max_new_tokens=3, ignore_eos=True).usage.completion_tokens == 3
            stopped = rank_pid(server.process.pid, 0, 0)  # the driver: rank 1's wait for it times out
            os.kill(stopped, signal.SIGSTOP)
            stopped_at = time.monotonic()
            wait_until(lambda: not replica_states(client)[0][0], timeout=30, what="the replica counted as failed")
            noticed_s = time.monotonic() - stopped_at
            wait_until(lambda: replica_states(client) == [(True, 1)], timeout=90, what="the replica restarted")
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.stop()
    print(f"stopped driver noticed after {noticed_s:.2f} s (collective timeout 3 s)")
    assert noticed_s < 3 + 5 + 2, noticed_s  # the timeout, then up to one keepalive interval already waited


@pytest.fixture(scope="module")
def poisoned_server(tmp_path_factory):
    """Two replicas whose driver exits at any step that holds the marker POISON."""
    server = start_server(
        tmp_path_factory.mktemp("logs"),
        *("--replicas", "2", "--kv-cache-memory", KV, "--restart-backoff", "0.2"),
        env={"SHARDGATE_FAULT": "prompt=POISON,kind=exit"},
    )
    yield server
    server.stop()


def test_a_request_that_kills_its_replicas_ends_unavailable_after_one_retry(poisoned_server):
    server = poisoned_server
    with server.client() as client, ThreadPoolExecutor(4) as pool:
        assert replica_states(client) == [(True, 0), (True, 0)]
        with pytest.raises(grpc.RpcError) as failure:
            poison(server, "a POISON pill")
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed 2 times" in failure.value.details()

        # both replicas went down (the first run and the one retry) and come back
        wait_until(lambda: replica_states(client) == [(True, 1), (True, 1)], timeout=120, what="both replicas restarted")
        others = list(pool.map(lambda i: client.generate(f"fine {i}", max_new_tokens=4, ignore_eos=True), range(8)))
        assert all(len(result.token_ids) == 4 for result in others)
        assert {result.usage.replica for result in others} == {0, 1}
    log = server.log()
    assert log.count("ends UNAVAILABLE after 1 retries") == 1
    assert "replica 0 is serving again" in log and "replica 1 is serving again" in log


def test_with_no_retries_the_request_ends_at_the_first_failure(tmp_path):
    server = start_server(
        tmp_path,
        *("--replicas", "2", "--kv-cache-memory", KV, "--restart-backoff", "0.2", "--max-request-retries", "0"),
        env={"SHARDGATE_FAULT": "prompt=POISON,kind=exit"},
    )
    try:
        with server.client() as client:
            with pytest.raises(grpc.RpcError) as failure:
                poison(server, "POISON")
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            wait_until(lambda: any(restarts for _, restarts in replica_states(client)), 120, "the failed replica restarted")
            wait_until(lambda: all(healthy for healthy, _ in replica_states(client)), 120, "both replicas serve")
            assert sum(restarts for _, restarts in replica_states(client)) == 1  # only the replica that ran it went down
    finally:
        server.stop()
    assert "ends UNAVAILABLE after 0 retries" in server.log()
