"""Embed through the real server: calls batched by the dynamic batcher, results as if alone."""

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from servers import start_server

from shardgate.proto import inference_pb2

CALLS = 64


@pytest.fixture(scope="module")
def embed_server(tmp_path_factory):
    flags = [
        "--embed-max-batch-size",
        "32",
        "--embed-max-queue-delay-us",
        "50000",
        "--embed-preferred-batch-sizes",
        "16,32",
        "--embed-max-inputs",
        "8",
        "--max-batch-tokens",
        "1024",
        "--kv-cache-memory",
        str(32 << 20),
    ]
    server = start_server(tmp_path_factory.mktemp("logs"), *flags)
    yield server
    server.stop()


@pytest.fixture
def client(embed_server):
    with embed_server.client() as client:
        yield client


@pytest.fixture
def stub(embed_server):
    with embed_server.raw_stub() as stub:
        yield stub


def embed(stub, *inputs, **fields):
    return stub.Embed(inference_pb2.EmbedRequest(inputs=list(inputs), **fields), timeout=60)


def embed_passes(client) -> int:
    return client.server_status().replicas[0].embed_forward_passes


def test_concurrent_calls_share_forward_passes_and_equal_their_unbatched_results(client, stub):
    texts = [f"input number {i}: " + "abc" * (i % 7) for i in range(CALLS)]
    before = embed_passes(client)
    alone = [list(embed(stub, text).embeddings[0].values) for text in texts]  # one call at a time
    assert embed_passes(client) - before == CALLS  # each ran in a forward of its own

    before = embed_passes(client)
    futures = [stub.Embed.future(inference_pb2.EmbedRequest(inputs=[text]), timeout=60) for text in texts]
    batched = [list(f.result().embeddings[0].values) for f in futures]
    passes = embed_passes(client) - before
    assert passes < CALLS, passes
    for one, other in zip(alone, batched):
        assert len(one) == len(other) == 128
        assert max(abs(a - b) for a, b in zip(one, other)) <= 1e-5
    status = client.server_status()
    assert status.replicas[0].free_kv_blocks == status.replicas[0].total_kv_blocks and status.active_requests == 0


def test_pooling_normalization_and_usage(client, stub):
    response = embed(stub, "hello world", "hello", pooling=inference_pb2.POOLING_LAST, normalize=True)
    [first, second] = response.embeddings
    assert first.tokens == 12 and second.tokens == 6 and response.usage.prompt_tokens == 18  # bytes + BOS
    assert all(math.isclose(sum(v * v for v in e.values), 1.0, rel_tol=1e-5) for e in response.embeddings)
    mean = embed(stub, "hello world").embeddings[0].values
    last = embed(stub, "hello world", pooling=inference_pb2.POOLING_LAST).embeddings[0].values
    assert max(abs(a - b) for a, b in zip(mean, last)) > 1e-3
    norm = math.sqrt(sum(v * v for v in last))
    assert max(abs(v / norm - w) for v, w in zip(last, first.values)) < 1e-6
    info = client.model_info()
    assert info.hidden_size == 128 and info.max_embed_inputs == 8


def test_embedding_beside_generation_changes_neither(client, stub, embed_server):
    expected = client.generate("generating", max_new_tokens=64, temperature=0, ignore_eos=True).token_ids
    alone = embed(stub, "during generation").embeddings[0].values

    def generate():
        with embed_server.client() as c:
            return c.generate("generating", max_new_tokens=64, temperature=0, ignore_eos=True).token_ids

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate)
        during = [embed(stub, "during generation").embeddings[0].values for _ in range(3)]
        assert running.result() == expected
    assert all(max(abs(a - b) for a, b in zip(alone, d)) <= 1e-5 for d in during)


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(inputs=[]), "inputs"),
        (dict(inputs=["x"] * 9), "inputs"),
        (dict(inputs=["ok", ""]), "inputs[1]"),
        (dict(inputs=["y" * 1100]), "inputs[0]"),  # more tokens than one step computes
        (dict(inputs=["x"], pooling=7), "pooling"),
        (dict(inputs=["x"], priority=-101), "priority"),
        (dict(inputs=["x"], request_id="r" * 300), "request_id"),
    ],
)
def test_bad_embed_requests_name_the_field(stub, fields, field):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(inference_pb2.EmbedRequest(**fields), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}: "), raised.value.details()
