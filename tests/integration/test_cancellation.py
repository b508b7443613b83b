"""Cancellation soak: streams cancelled at random points leave the server exactly as it was."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from servers import start_server, wait_until

from shardgate.clients import build_request

STREAMS = 200


def snapshot(client) -> tuple[int, int, int, int, int]:
    status = client.server_status()
    replica = status.replicas[0]
    return replica.free_kv_blocks, replica.running_requests, replica.waiting_requests, status.queued_requests, status.active_requests


def test_two_hundred_streams_cancelled_at_random_points_leave_no_trace(tmp_path):
    # 8 sequences at a time and 32 tokens a step: with 12 callers some requests queue, prompts
    # take several steps to prefill, and long ones are preempted when the 4096-token cache fills.
    server = start_server(tmp_path, "--max-num-seqs", "8", "--max-batch-tokens", "32", "--kv-cache-memory", str(8 << 20))
    try:
        with server.client() as client:
            baseline = snapshot(client)
            assert baseline[0] > 0 and baseline[1:] == (0, 0, 0, 0)

            def one(i: int) -> str:
                rng = random.Random(i)
                mode = rng.choice(["at once", "after a delay", "after tokens", "during prefill"])
                length = rng.randint(1200, 1600) if mode == "during prefill" else rng.randint(10, 400)
                prompt = "".join(rng.choice("abcdefgh ") for _ in range(length))
                message = build_request(prompt, max_new_tokens=rng.randint(20, 300), temperature=rng.choice([0.0, 1.0]), ignore_eos=True)
                with server.raw_stub() as stub:
                    call = stub.GenerateStream(message, timeout=120)
                    if mode == "at once":
                        call.cancel()
                    elif mode == "after a delay":
                        threading.Timer(rng.uniform(0, 0.3), call.cancel).start()
                    elif mode == "during prefill":  # a prompt of ~1400 tokens takes ~50 steps at 32 tokens a step
                        threading.Timer(rng.uniform(0.02, 0.2), call.cancel).start()
                    cancel_after = rng.randint(1, 30)
                    tokens = 0
                    try:
                        for message in call:
                            tokens += len(message.token_ids)
                            if mode == "after tokens" and tokens >= cancel_after:
                                call.cancel()
                    except grpc.RpcError as error:
                        assert error.code() == grpc.StatusCode.CANCELLED, error.details()
                        return "before any token" if tokens == 0 else "mid-decode"
                    return "finished first"

            with ThreadPoolExecutor(12) as pool:
                outcomes = list(pool.map(one, range(STREAMS)))
            assert outcomes.count("before any token") >= 20 and outcomes.count("mid-decode") >= 20, outcomes

            wait_until(lambda: snapshot(client) == baseline, what="free KV blocks, running and queued counts back at baseline")
            assert snapshot(client) == baseline
            assert len(client.generate("still serving", max_new_tokens=4, ignore_eos=True).token_ids) == 4
    finally:
        server.stop()
    assert "Traceback" not in server.log()
