"""A broken replica is noticed, its streams continue on the other replica, which keeps serving,
and the broken one comes back."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from processes import children_of
from servers import start_server

from shardgate.proto import inference_pb2

KV = str(16 << 20)
# The default --step-timeout (60 s) is only the ceiling: a step's deadline follows the measured step time.
FLAGS = ("--replicas", "2", "--tp", "2", "--kv-cache-memory", KV, "--restart-backoff", "0.2")
STREAMS = 16
TOKENS = 300
"""Each stream's: enough that every stream is still running when its replica fails."""


def rank_pid(gateway_pid: int, replica: int, rank: int) -> int:
    for pid in children_of(gateway_pid):
        with open(f"/proc/{pid}/environ", "rb") as environ:
            env = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
        if env.get(b"SHARDGATE_REPLICA", b"").split(b":")[0] == str(replica).encode() and env.get(b"RANK") == str(rank).encode():
            return pid
    raise AssertionError(f"no process for replica {replica} rank {rank}")


def status(client) -> inference_pb2.ServerStatusResponse:
    return client.server_status(timeout=10)


def run_streams(server, started: threading.Barrier):
    """One stream; returns (end time, status code name, replica or None, tokens, resumes)."""

    def one(i):
        tokens, replica, resumes = 0, None, 0
        try:
            with server.client(timeout=300) as client:
                for delta in client.stream(f"stream {i}", max_new_tokens=TOKENS, temperature=0, ignore_eos=True):
                    tokens += len(delta.token_ids)
                    if tokens == 1:
                        started.wait(120)
                    if delta.usage is not None:
                        replica, resumes = delta.usage.replica, delta.usage.resumes
            return time.monotonic(), "OK", replica, tokens, resumes
        except grpc.RpcError as error:
            return time.monotonic(), error.code().name, replica, tokens, resumes

    return one


@pytest.mark.parametrize("fault", ["kill", "sigstop", "raise"])
def test_failed_replica_ends_its_streams_others_serve_and_it_comes_back(fault, tmp_path):
    env = {"SHARDGATE_FAULT": "replica=0,rank=1,step=40,kind=raise"} if fault == "raise" else None
    server = start_server(tmp_path, *FLAGS, env=env)
    stopped_pid = None
    try:
        started = threading.Barrier(STREAMS + 1)
        with ThreadPoolExecutor(STREAMS) as pool, server.client() as client:
            futures = [pool.submit(run_streams(server, started), i) for i in range(STREAMS)]
            started.wait(180)  # every stream has a token
            broke_at = time.monotonic()
            if fault == "kill":
                os.kill(rank_pid(server.process.pid, 0, 1), signal.SIGKILL)
            elif fault == "sigstop":
                stopped_pid = rank_pid(server.process.pid, 0, 1)
                os.kill(stopped_pid, signal.SIGSTOP)
            while status(client).replicas[0].healthy:  # kill: at once; sigstop: the step's deadline; raise: step 40
                assert time.monotonic() - broke_at < 60
                time.sleep(0.05)
            noticed_at = time.monotonic()
            # the other replica keeps serving new requests while replica 0 is down
            during = [client.generate("meanwhile", max_new_tokens=4, ignore_eos=True) for _ in range(3)]
            results = [f.result() for f in futures]
            deadline = time.monotonic() + 60
            while not (status(client).replicas[0].healthy and status(client).replicas[0].restarts >= 1):
                assert time.monotonic() < deadline, "replica 0 did not come back within 60 s"
                time.sleep(0.2)
            back_at = time.monotonic()
            after = list(pool.map(lambda i: client.generate(f"after {i}", max_new_tokens=4, ignore_eos=True), range(8)))
    finally:
        if stopped_pid is not None:
            try:
                os.kill(stopped_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.stop()

    # every stream completes: those of replica 0 continued on replica 1 (tests/integration/test_resume.py checks their tokens)
    assert all(code == "OK" and tokens == TOKENS and replica == 1 for _, code, replica, tokens, _ in results), results
    resumed = [r for r in results if r[4] == 1]
    assert resumed and all(resumes in (0, 1) for *_, resumes in results)
    # the injected fault fires at step 40, some time after the streams started: count from when the
    # gateway noticed it instead
    broke_at = noticed_at if fault == "raise" else broke_at
    # a stopped rank: noticed within 10 s of when its step should have answered (a few ms here), by a
    # deadline of 10 × the measured time of such steps, at least --step-timeout-floor (8 s)
    print(f"{fault}: noticed {noticed_at - broke_at:.2f} s after the fault")
    assert noticed_at - broke_at < 10, noticed_at - broke_at
    assert all(len(r.token_ids) == 4 for r in during) and during[0].usage.replica == 1
    assert back_at - broke_at < 60 and all(len(r.token_ids) == 4 for r in after)
    assert "replica 0 is serving again" in server.log()
