"""SIGTERM drains: NOT_SERVING and UNAVAILABLE for new calls at once; in-flight requests finish
within --drain-timeout, or end `cancelled` when it is 0; then nothing of shardgate is left."""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from processes import children_of, wait_gone
from servers import start_server

KV = str(16 << 20)


def drain_scenario(tmp_path, drain_timeout: str, max_new_tokens: int):
    server = start_server(tmp_path, "--kv-cache-memory", KV, "--drain-timeout", drain_timeout, "--tp", "2")
    shards = children_of(server.process.pid)
    started = threading.Barrier(5)

    def stream(i):
        with server.client(timeout=120) as client:
            deltas = []
            for delta in client.stream(f"drain {i}", max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True):
                deltas.append(delta)
                if len(deltas) == 1:
                    started.wait(60)
            return deltas

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        started.wait(120)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        with server.client(timeout=10) as client, pytest.raises(grpc.RpcError) as refused:
            client.generate("too late", max_new_tokens=2)
        results = [f.result() for f in futures]
    code = server.process.wait(60)
    exited = time.monotonic() - signalled
    return results, refused.value, code, exited, shards, server.log()


def test_drain_lets_in_flight_requests_finish(tmp_path):
    results, refused, code, _, shards, log = drain_scenario(tmp_path, "60", max_new_tokens=80)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    for deltas in results:
        assert deltas[-1].finish_reason == "length" and sum(len(d.token_ids) for d in deltas) == 80
    assert code == 0 and wait_gone(shards, 10) == [] and "Traceback" not in log


def test_drain_timeout_zero_cancels_in_flight_and_exits_fast(tmp_path):
    results, refused, code, exited, shards, log = drain_scenario(tmp_path, "0", max_new_tokens=1500)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    for deltas in results:
        assert deltas[-1].finish_reason == "cancelled" and sum(len(d.token_ids) for d in deltas) < 1500
    # the ranks stop driver first: none is ended inside a step's collective (no failed step in the log)
    assert code == 0 and exited < 5 and wait_gone(shards, 10) == [] and "Traceback" not in log
