"""Continuous batching through the real server: concurrency, joining mid-decode."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor


def test_sixteen_concurrent_streams_match_their_solo_outputs(tiny_server, client):
    prompts = [f"prompt number {i} " + "abc" * (i * 3) for i in range(16)]  # 16 different lengths
    params = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
    solo = [client.generate(p, **params).token_ids for p in prompts]

    def stream(prompt):
        with tiny_server.client() as c:
            deltas = list(c.stream(prompt, **params))
        return [t for d in deltas for t in d.token_ids], deltas[-1].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, prompts))
    for (tokens, reason), expected in zip(results, solo):
        assert reason == "length" and tokens == expected


def test_request_arriving_mid_decode_starts_and_finishes_before_the_others(tiny_server):
    long_params = dict(max_new_tokens=400, temperature=0, ignore_eos=True)
    started = threading.Barrier(5)
    finished_at: dict[str, float] = {}

    def long_stream(i):
        with tiny_server.client() as c:
            for n, _ in enumerate(c.stream(f"long request {i}", **long_params)):
                if n == 2:
                    started.wait(60)  # every long stream is decoding
        finished_at[f"long{i}"] = time.monotonic()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(long_stream, i) for i in range(4)]
        started.wait(120)
        with tiny_server.client() as c:
            short = c.generate("late arrival", max_new_tokens=4, temperature=0, ignore_eos=True)
        finished_at["short"] = time.monotonic()
        for future in futures:
            future.result()
    assert len(short.token_ids) == 4
    assert finished_at["short"] < min(v for k, v in finished_at.items() if k.startswith("long"))
