"""Tenants through a real server with two API keys: the prefix cache is shared only within a key
(unless --prefix-cache-sharing global), a request's cache_salt narrows sharing further, and
--max-concurrent-requests-per-key refuses a key's extra requests without naming the key."""

import random

import grpc
import openai
import pytest
from servers import start_server, wait_until

from shardgate.clients import build_request
from shardgate.proto import inference_pb2
from shardgate.proto.common import free_port

rng = random.Random(15)
PREFIX = [rng.randrange(1, 256) for _ in range(160)]  # ten full 16-token blocks
OTHER_PREFIX = [rng.randrange(1, 256) for _ in range(160)]
KEYS = {"a": "tenant-a-secret-key", "b": "tenant-b-secret-key"}
QUOTA = 3


def start(tmp_path_factory, *flags: str):
    directory = tmp_path_factory.mktemp("tenants")
    keys = directory / "keys.txt"
    keys.write_text("".join(f"{key}\n" for key in KEYS.values()))
    keys.chmod(0o600)
    return start_server(directory, "--api-key-file", str(keys), "--max-concurrent-requests-per-key", str(QUOTA), *flags)


@pytest.fixture(scope="module")
def per_key(tmp_path_factory):
    http_port = free_port()
    server = start(tmp_path_factory, "--http-port", str(http_port))
    server.http_url = f"http://127.0.0.1:{http_port}/v1"
    yield server
    server.stop()


def cached_tokens(stub, tenant: str, suffix: int, cache_salt: str = "") -> int:
    """cached_tokens of a request of `tenant` whose prompt is PREFIX and a suffix of its own."""
    request = build_request(PREFIX + [suffix, suffix], max_new_tokens=2, temperature=0, cache_salt=cache_salt)
    response = stub.Generate(request, metadata=(("authorization", f"Bearer {KEYS[tenant]}"),), timeout=60)
    return response.usage.cached_tokens


def test_a_tenant_never_gets_another_tenants_cached_prefix(per_key):
    with per_key.raw_stub() as stub:
        assert cached_tokens(stub, "a", 1) == 0
        assert cached_tokens(stub, "b", 2) == 0  # shares A's first 160 tokens: no hit, no oracle
        assert cached_tokens(stub, "a", 3) == 160  # within one key, sharing goes on
        assert cached_tokens(stub, "b", 4) == 160  # B's own first request is now cached for B


def test_a_key_is_one_tenant_over_grpc_and_openai_http(per_key):
    def over_http(tenant: str, suffix: int) -> int:
        with openai.OpenAI(base_url=per_key.http_url, api_key=KEYS[tenant], max_retries=0) as client:
            completion = client.completions.create(model="builtin:tiny", prompt=OTHER_PREFIX + [suffix] * 2, max_tokens=2, temperature=0)
        return completion.usage.prompt_tokens_details.cached_tokens

    def over_grpc(stub, tenant: str, suffix: int) -> int:
        request = build_request(OTHER_PREFIX + [suffix, suffix], max_new_tokens=2, temperature=0)
        return stub.Generate(request, metadata=(("authorization", f"Bearer {KEYS[tenant]}"),), timeout=60).usage.cached_tokens

    with per_key.raw_stub() as stub:
        assert over_grpc(stub, "a", 1) == 0
        assert over_http("b", 2) == 0  # another key over another protocol: no hit
        assert over_http("a", 3) == 160  # A's gRPC request is A's cache over HTTP too
        assert over_grpc(stub, "b", 4) == 160  # and B's HTTP request is B's over gRPC


def test_cache_salt_narrows_sharing_within_a_key(per_key):
    with per_key.raw_stub() as stub:
        cached_tokens(stub, "a", 5)
        assert cached_tokens(stub, "a", 6) == 160
        assert cached_tokens(stub, "a", 7, cache_salt="user-1") == 0
        assert cached_tokens(stub, "a", 8, cache_salt="user-2") == 0
        assert cached_tokens(stub, "a", 9, cache_salt="user-1") == 160
        with pytest.raises(grpc.RpcError) as refused:
            cached_tokens(stub, "a", 10, cache_salt="x" * 257)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.details().startswith("cache_salt")


def test_a_keys_quota_refuses_its_extra_requests_without_naming_the_key(per_key):
    a = (("authorization", f"Bearer {KEYS['a']}"),)
    b = (("authorization", f"Bearer {KEYS['b']}"),)
    with per_key.raw_stub() as stub:
        long = build_request("held", max_new_tokens=2000, ignore_eos=True)
        calls = [stub.GenerateStream(long, metadata=a, timeout=120) for _ in range(QUOTA)]
        try:
            for call in calls:
                next(call)  # running
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(build_request("one too many", max_new_tokens=2), metadata=a, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = refused.value.details()
            assert details.startswith("max_concurrent_requests_per_key") and "--max-concurrent-requests-per-key 3" in details
            assert KEYS["a"] not in details
            assert stub.Generate(build_request("another key", max_new_tokens=2), metadata=b, timeout=30).usage.completion_tokens == 2
        finally:
            for call in calls:
                call.cancel()
        wait_until(lambda: stub.ServerStatus(inference_pb2.ServerStatusRequest(), metadata=a).active_requests == 0)
        assert stub.Generate(build_request("quota free again", max_new_tokens=2), metadata=a, timeout=30).usage.completion_tokens == 2


def test_global_sharing_shares_across_keys_and_cache_salt_still_narrows(tmp_path_factory):
    server = start(tmp_path_factory, "--prefix-cache-sharing", "global")
    try:
        with server.raw_stub() as stub:
            assert cached_tokens(stub, "a", 1) == 0
            assert cached_tokens(stub, "b", 2) == 160
            assert cached_tokens(stub, "b", 3, cache_salt="private") == 0
    finally:
        server.stop()
