"""A KV cache too small for the load: requests are preempted and recomputed, and greedy output
does not change."""

from servers import start_server

from shardgate.clients import build_request

BLOCK_BYTES = 32 * 1024  # builtin:tiny, float32: 2 (K, V) x 4 layers x 16 tokens x 2 heads x 32 dims x 4 bytes


def test_small_kv_cache_preempts_and_keeps_greedy_tokens(tmp_path):
    # 24 blocks = 384 tokens, while 8 requests of up to ~130 tokens each want ~1000.
    server = start_server(tmp_path, "--kv-cache-memory", str(24 * BLOCK_BYTES), "--max-num-seqs", "8")
    try:
        with server.client() as client, server.raw_stub() as stub:
            assert client.model_info().kv_capacity_tokens[0] == 384
            prompts = [f"request {i}: " + "xyz" * i for i in range(8)]
            params = dict(max_new_tokens=100, temperature=0, ignore_eos=True)
            unloaded = [client.generate(p, **params).token_ids for p in prompts]
            assert client.server_status().replicas[0].preemptions == 0

            futures = [stub.Generate.future(build_request(p, **params), timeout=300) for p in prompts]
            loaded = [list(f.result().token_ids) for f in futures]
            status = client.server_status()
            assert loaded == unloaded
            assert status.replicas[0].preemptions > 0
            assert status.replicas[0].free_kv_blocks == 24 and status.active_requests == 0
    finally:
        server.stop()
