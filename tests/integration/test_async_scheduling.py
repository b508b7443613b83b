"""Async scheduling through real servers: the gateway sends each step while the one before it
runs (the default) and the driver feeds decodes the tokens it sampled. Its output is that of a
server that plans each step after the one before answered (--no-async-scheduling), requests that
end mid-pipeline end with exactly their tokens, cancelled ones free their KV blocks, and prompts
arriving during decodes join as usual."""

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from servers import start_server, wait_until

from shardgate.clients import build_request

# Single decode steps (every decode of a running request is fed by the driver) and small steps,
# so that long prompts are prefilled in chunks beside the decodes.
FLAGS = ("--decode-steps", "1", "--max-batch-tokens", "64", "--kv-cache-memory", str(16 << 20))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    pipelined = start_server(logs, *FLAGS)
    stepwise = start_server(logs, *FLAGS, "--no-async-scheduling")
    yield pipelined, stepwise
    pipelined.stop()
    stepwise.stop()


def prompt(i: int) -> str:
    return f"request {i}: " + "xyz" * (i * 9)  # 11 to ~300 tokens


def snapshot(client) -> tuple[int, int, int, int]:
    status = client.server_status()
    replica = status.replicas[0]
    return replica.free_kv_blocks, replica.running_requests, replica.waiting_requests, status.active_requests


def stream_all(server, prompts: list[str], **params) -> list[tuple[list[int], list[float], str, int]]:
    """Streams every prompt at once; each one's tokens, logprobs, finish reason and completion_tokens."""

    def one(text: str):
        with server.client() as client:
            deltas = list(client.stream(text, **params))
        tokens = [t for d in deltas for t in d.token_ids]
        return tokens, [p for d in deltas for p in d.logprobs], deltas[-1].finish_reason, deltas[-1].usage.completion_tokens

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=42)], ids=["greedy", "seeded"])
def test_outputs_are_those_of_a_server_that_waits_for_each_step(servers, sampling):
    pipelined, stepwise = servers
    prompts = [prompt(i) for i in range(12)]
    params = dict(max_new_tokens=24, ignore_eos=True, logprobs=True, **sampling)
    ours, theirs = stream_all(pipelined, prompts, **params), stream_all(stepwise, prompts, **params)
    for (tokens, logprobs, reason, count), (expected, expected_logprobs, _, _) in zip(ours, theirs):
        assert tokens == expected and reason == "length" and count == len(tokens) == 24
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)


def test_a_request_that_ends_mid_pipeline_has_exactly_its_tokens(servers):
    pipelined, stepwise = servers
    with stepwise.client() as client:
        full = client.generate("where does it stop", max_new_tokens=40, temperature=0, ignore_eos=True)
    stop = full.text[20:23]  # met at some token in the middle of the 40
    start = full.text.find(stop)
    for server in servers:
        with server.client() as client:
            ended = client.generate("where does it stop", max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
            deltas = list(client.stream("where does it stop", max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))
            short = client.generate("where does it stop", max_new_tokens=7, temperature=0, ignore_eos=True)
        assert ended.finish_reason == "stop" and ended.text == full.text[:start]
        assert ended.token_ids == full.token_ids[: len(ended.token_ids)] and len(ended.token_ids) < 40
        assert ended.usage.completion_tokens == len(ended.token_ids)  # the token computed after it is dropped, not counted
        assert [t for d in deltas for t in d.token_ids] == ended.token_ids and "".join(d.text for d in deltas) == ended.text
        assert short.finish_reason == "length" and short.token_ids == full.token_ids[:7] and short.usage.completion_tokens == 7
    with pipelined.client() as client:
        wait_until(lambda: snapshot(client)[1:] == (0, 0, 0), what="every request ended")


def test_cancelled_streams_free_their_kv_blocks(servers):
    pipelined, _ = servers
    with pipelined.client() as client:
        baseline = snapshot(client)
        assert baseline[0] > 0 and baseline[1:] == (0, 0, 0)

        def cancel_after(i: int) -> int:
            message = build_request(prompt(i), max_new_tokens=400, temperature=0, ignore_eos=True)
            with pipelined.raw_stub() as stub:
                call = stub.GenerateStream(message, timeout=120)
                tokens = 0
                try:
                    for response in call:
                        tokens += len(response.token_ids)
                        if tokens >= 2 + i:
                            call.cancel()
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.CANCELLED
                return tokens

        with ThreadPoolExecutor(8) as pool:
            assert all(n >= 2 for n in pool.map(cancel_after, range(8)))
        wait_until(lambda: snapshot(client) == baseline, what="free KV blocks and request counts back at baseline")


def test_prompts_arriving_during_decodes_join_and_match_their_solo_outputs(servers):
    pipelined, stepwise = servers
    params = dict(max_new_tokens=16, temperature=0, ignore_eos=True)
    late = [prompt(i) for i in range(3, 11)]  # 38 to ~250 tokens: several are prefilled in chunks
    with stepwise.client() as client:
        solo = [client.generate(text, **params).token_ids for text in late]
    decoding = threading.Barrier(4 + 1)

    def long_stream(i: int) -> int:
        with pipelined.client() as client:
            count = 0
            for delta in client.stream(f"long {i}", max_new_tokens=300, temperature=0, ignore_eos=True):
                count += len(delta.token_ids)
                if count == 2:
                    decoding.wait(60)
            return count

    with ThreadPoolExecutor(4) as pool:
        longs = [pool.submit(long_stream, i) for i in range(4)]
        decoding.wait(120)
        joined = stream_all(pipelined, late, **params)
        assert all(not f.done() for f in longs)  # they arrived while the long streams decoded
        assert [f.result() for f in longs] == [300] * 4
    assert [tokens for tokens, *_ in joined] == solo
