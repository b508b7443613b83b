"""Soak: mixed streams with random cancels and deadlines. Memory and file descriptors stay flat
after warm-up, and KV blocks and request counts return to their baseline.

CI runs it briefly; SHARDGATE_SOAK_SECONDS=600 runs the ten-minute version."""

import os
import random
import threading
import time

import grpc
import pytest
from processes import children_of
from servers import start_server

from shardgate.proto import inference_pb2, inference_pb2_grpc

DURATION_S = float(os.environ.get("SHARDGATE_SOAK_SECONDS", "20"))
WORKERS = 8


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def one_request(stub, rng: random.Random) -> str:
    kind = rng.choice(["stream-cancel", "stream", "deadline", "unary", "embed"])
    request = inference_pb2.GenerateRequest(prompt="soak " * rng.randint(1, 60), max_new_tokens=rng.randint(1, 64), ignore_eos=True)
    try:
        if kind == "stream-cancel":
            call = stub.GenerateStream(request, timeout=60)
            stop_after = rng.randint(0, 20)
            for n, _ in enumerate(call):
                if n >= stop_after:
                    break
            call.cancel()
        elif kind == "stream":
            list(stub.GenerateStream(request, timeout=60))
        elif kind == "deadline":
            request.timeout_ms = rng.randint(1, 200)
            list(stub.GenerateStream(request, timeout=60))
        elif kind == "unary":
            stub.Generate(request, timeout=rng.choice([0.05, 0.5, 60]))
        else:
            stub.Embed(inference_pb2.EmbedRequest(inputs=["soak"] * rng.randint(1, 8)), timeout=60)
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


@pytest.mark.timeout(DURATION_S + 180)
def test_soak_leaves_nothing_behind(tmp_path):
    server = start_server(tmp_path, "--kv-cache-memory", str(32 << 20), "--max-num-seqs", "16")
    pids = [server.process.pid, *children_of(server.process.pid)]
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            baseline = stub.ServerStatus(inference_pb2.ServerStatusRequest()).replicas[0]
            end = time.monotonic() + DURATION_S
            warm = {}

            def worker(seed: int) -> None:
                rng = random.Random(seed)
                while time.monotonic() < end:
                    outcome = one_request(stub, rng)
                    with lock:
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1

            threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(WORKERS)]
            for thread in threads:
                thread.start()
            time.sleep(DURATION_S * 0.25)  # warm-up: allocator pools, caches, thread pools fill
            warm = {pid: (rss_bytes(pid), open_fds(pid)) for pid in pids}
            for thread in threads:
                thread.join()
            time.sleep(1)  # cancelled calls' cleanup
            final = {pid: (rss_bytes(pid), open_fds(pid)) for pid in pids}
            status = stub.ServerStatus(inference_pb2.ServerStatusRequest())
    finally:
        server.stop()

    print(f"soak {DURATION_S:.0f} s outcomes: {outcomes}; rss/fds warm {warm} final {final}")
    assert sum(outcomes.values()) > 50 and outcomes.get("OK", 0) > 0
    assert set(outcomes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
    replica = status.replicas[0]
    assert replica.free_kv_blocks == baseline.free_kv_blocks == replica.total_kv_blocks
    assert replica.running_requests == replica.waiting_requests == 0
    assert status.active_requests == status.queued_requests == 0
    for pid in pids:
        (rss_warm, fds_warm), (rss_final, fds_final) = warm[pid], final[pid]
        assert rss_final < rss_warm * 1.05, f"pid {pid}: rss grew {rss_warm} -> {rss_final}"
        assert fds_final <= fds_warm + 2, f"pid {pid}: fds grew {fds_warm} -> {fds_final}"
