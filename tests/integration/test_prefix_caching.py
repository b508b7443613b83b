"""Prefix caching through a real server: requests sharing a long prompt prefix get the same
greedy tokens with and without it, even when a small KV cache makes them preempt each other,
and usage.cached_tokens and the prefix-cache metrics show the hits."""

import random
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from servers import start_server

from shardgate.clients import build_request
from shardgate.proto.common import free_port

BLOCK_BYTES = 32 * 1024  # builtin:tiny, float32: one 16-token block of all layers' K and V
rng = random.Random(7)
PREFIX = [rng.randrange(1, 256) for _ in range(80)]  # five full blocks
PROMPTS = [PREFIX + [rng.randrange(1, 256) for _ in range(rng.randint(1, 20))] for _ in range(8)]
PARAMS = dict(max_new_tokens=60, temperature=0, ignore_eos=True)


def run(server) -> tuple[list[list[int]], list[int], int, int]:
    """One request, then the rest at once: their tokens and cached_tokens, preemptions and free
    blocks at the end."""
    with server.client(timeout=300) as client, server.raw_stub() as stub:
        first = client.generate(PROMPTS[0], **PARAMS)
        futures = [stub.Generate.future(build_request(p, **PARAMS), timeout=300) for p in PROMPTS[1:]]
        rest = [f.result() for f in futures]
        status = client.server_status()
        assert status.active_requests == 0
        [replica] = status.replicas
        return (
            [first.token_ids] + [list(r.token_ids) for r in rest],
            [first.usage.cached_tokens] + [r.usage.cached_tokens for r in rest],
            replica.preemptions,
            replica.free_kv_blocks,
        )


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if s.labels.get("replica") == "0"}


def test_shared_prefixes_give_the_same_tokens_with_and_without_prefix_caching(tmp_path):
    # 24 blocks: the eight requests want ~60 without sharing, so some are preempted either way.
    flags = ("--kv-cache-memory", str(24 * BLOCK_BYTES), "--max-batch-tokens", "64")
    metrics_port = free_port()
    server = start_server(tmp_path, *flags, "--metrics-port", str(metrics_port))
    try:
        tokens, cached, preemptions, free_blocks = run(server)
        samples = scrape(metrics_port)
    finally:
        server.stop()
    assert cached[0] == 0 and all(c % 16 == 0 for c in cached) and sum(c >= 80 for c in cached[1:]) >= 4
    assert samples["shardgate_prefix_cache_hit_tokens_total"] >= sum(cached)  # recomputations after preemptions hit too
    assert samples["shardgate_prefix_cache_query_tokens_total"] >= sum(len(p) for p in PROMPTS)
    assert preemptions > 0 and free_blocks == 24  # every block back: free or evictable

    server = start_server(tmp_path, *flags, "--no-prefix-caching")
    try:
        plain_tokens, plain_cached, _, plain_free = run(server)
    finally:
        server.stop()
    assert plain_tokens == tokens and plain_cached == [0] * len(PROMPTS) and plain_free == 24
