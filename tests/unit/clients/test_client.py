"""The client library against an in-process fake server: every method, sync and async, the
exception for each status, retries only before the first token, deadlines, TLS, bearer token
and trace-context injection."""

import asyncio

import grpc
import pytest
from fake_inference import STREAM_TOKENS, self_signed_certificate, start_fake_server

from shardgate.clients import (
    TLS,
    AsyncClient,
    Cancelled,
    Client,
    Completion,
    DeadlineExceeded,
    Delta,
    InvalidRequest,
    ModelInfo,
    Overloaded,
    PermissionDenied,
    RequestFailed,
    Retry,
    ServerError,
    ShardgateError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

FAST_RETRY = Retry(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


@pytest.fixture
def server():
    running = start_fake_server()
    yield running
    running.stop()


@pytest.fixture
def fake(server):
    return server.fake


@pytest.fixture
def client(server):
    with Client(server.address, timeout=10) as client:
        yield client


def run_async(address, use, **options):
    """Runs `await use(client)` with an AsyncClient in a fresh event loop."""

    async def main():
        async with AsyncClient(address, **options) as client:
            return await use(client)

    return asyncio.run(main())


# --- every method -------------------------------------------------------------------------


def test_generate_returns_a_typed_completion(client, fake):
    completion = client.generate("hi", max_new_tokens=3, temperature=0, seed=7, stop=["x"], priority=2, timeout_ms=500, request_id="r1")
    assert isinstance(completion, Completion)
    assert (completion.request_id, completion.text, completion.token_ids, completion.finish_reason) == (
        "r1",
        "abc",
        STREAM_TOKENS,
        "length",
    )
    assert completion.usage.completion_tokens == 3 and completion.usage.time_to_first_token_s == pytest.approx(0.02)
    sent = fake.calls[0].request
    assert sent.prompt == "hi" and sent.max_new_tokens == 3 and sent.temperature == 0 and sent.seed == 7
    assert list(sent.stop) == ["x"] and sent.priority == 2 and sent.timeout_ms == 500


def test_token_id_prompts_are_sent_as_ids(client, fake):
    client.generate([4, 5, 6], max_new_tokens=1)
    assert fake.calls[0].request.WhichOneof("input") == "prompt_token_ids"
    assert list(fake.calls[0].request.prompt_token_ids.ids) == [4, 5, 6]


def test_stream_yields_deltas_then_a_last_one_with_usage(client):
    deltas = list(client.stream("hi", max_new_tokens=3))
    assert all(isinstance(d, Delta) for d in deltas)
    assert [d.token_ids for d in deltas] == [[t] for t in STREAM_TOKENS] + [[]]
    assert "".join(d.text for d in deltas) == "abc"
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 3
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])


def test_embed_sends_options_and_returns_one_vector_per_input(client, fake):
    result = client.embed(["ab", "cde"], pooling="last", normalize=True, request_id="e1")
    assert result.request_id == "e1" and result.tokens == [2, 3]
    assert result.vectors == [[2, 0, 1, 1], [3, 1, 1, 1]]  # (length, index, POOLING_LAST, normalize)
    assert client.embed("one").vectors == [[3, 0, 0, 0]]  # a single string is one input, mean pooling
    with pytest.raises(ValueError, match="pooling"):
        client.embed("x", pooling="max")


def test_tokenize_model_info_and_health(client):
    assert client.tokenize("ab") == [97, 98] and client.tokenize("ab", add_special_tokens=True) == [1, 97, 98]
    info = client.model_info()
    assert isinstance(info, ModelInfo) and info.model == "fake" and info.kv_capacity_tokens == [1024] and info.max_embed_inputs == 8
    assert (info.quantization, info.weight_bytes_per_step, info.kv_bytes_per_token) == ("int8", 1234, 64)
    assert (info.num_hidden_layers, info.num_key_value_heads, info.head_dim) == (2, 2, 4)
    assert client.health() == "SERVING"


def test_bidi_stream_multiplexes_requests_with_per_request_failures(client):
    events = []
    with client.bidi() as stream:
        stream.generate("a", "p", max_new_tokens=2)
        stream.generate("bad", "p", max_new_tokens=0)
        stream.cancel("c")
        stream.generate("b", [1, 2], max_new_tokens=1)
        stream.done_writing()
        events = list(stream)
    by_id = {}
    for event in events:
        by_id.setdefault(event.request_id, []).append(event)
    assert "".join(d.text for d in by_id["a"]) == "a:0 a:1 " and by_id["a"][-1].finish_reason == "length"
    [failed] = by_id["bad"]
    assert isinstance(failed, RequestFailed) and isinstance(failed.error, InvalidRequest)
    assert failed.error.details().startswith("max_new_tokens:")
    assert by_id["c"][-1].finish_reason == "cancelled"
    assert [d.token_ids for d in by_id["b"]] == [[0], []]


def test_bidi_needs_request_ids(client):
    with client.bidi() as stream, pytest.raises(ValueError, match="request_id"):
        stream.generate("", "p", max_new_tokens=1)


def test_async_client_covers_every_method(server, fake):
    async def use(client):
        completion = await client.generate("hi", max_new_tokens=3)
        deltas = [d async for d in client.stream("hi", max_new_tokens=3)]
        embeddings = await client.embed(["ab"])
        ids = await client.tokenize("ab")
        info = await client.model_info()
        health = await client.health()
        bidi = client.bidi()
        await bidi.generate("x", "p", max_new_tokens=2)
        await bidi.generate("bad", "p", max_new_tokens=0)
        await bidi.done_writing()
        events = [e async for e in bidi]
        return completion, deltas, embeddings, ids, info, health, events

    completion, deltas, embeddings, ids, info, health, events = run_async(server.address, use, timeout=10)
    assert completion.text == "abc" and [d.token_ids for d in deltas] == [[5], [6], [7], []]
    assert embeddings.vectors == [[2, 0, 0, 0]] and ids == [97, 98] and info.model == "fake" and health == "SERVING"
    assert [(e.request_id, e.token_ids) for e in events if isinstance(e, Delta)] == [("x", [0]), ("x", [1]), ("x", [])]
    [failed] = [e for e in events if isinstance(e, RequestFailed)]
    assert failed.request_id == "bad" and isinstance(failed.error, InvalidRequest)
    assert fake.methods() == ["Generate", "GenerateStream", "Embed", "Tokenize", "ModelInfo", "GenerateBidi"]


# --- errors -------------------------------------------------------------------------------

EXPECTED_EXCEPTION = {
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: InvalidRequest,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.ABORTED: ServerError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: ServerError,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def test_every_status_code_has_an_expected_exception():
    assert set(EXPECTED_EXCEPTION) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


@pytest.mark.parametrize("code", list(EXPECTED_EXCEPTION), ids=lambda c: c.name)
def test_each_status_maps_to_its_exception(client, fake, code):
    fake.failures = [(code, "field: what went wrong")] * 2
    with pytest.raises(EXPECTED_EXCEPTION[code]) as raised:
        client.generate("hi")
    error = raised.value
    assert isinstance(error, ShardgateError) and isinstance(error, grpc.RpcError)  # raw-grpc callers still catch it
    assert error.code() == code and error.details() == "field: what went wrong"
    assert str(error) == f"{code.name}: field: what went wrong"
    with pytest.raises(EXPECTED_EXCEPTION[code]):
        list(client.stream("hi"))


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED], ids=lambda c: c.name
)
def test_async_client_maps_statuses_too(server, fake, code):
    fake.failures = [(code, "no")] * 3

    async def use(client):
        with pytest.raises(EXPECTED_EXCEPTION[code]):
            await client.generate("hi")
        with pytest.raises(EXPECTED_EXCEPTION[code]):
            [d async for d in client.stream("hi")]
        with pytest.raises(EXPECTED_EXCEPTION[code]):
            await client.embed("x")

    run_async(server.address, use)


def test_unimplemented_methods_raise_unimplemented(server):
    fake_less = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    port = fake_less.add_insecure_port("127.0.0.1:0")
    fake_less.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as client, pytest.raises(Unimplemented):
            client.embed("x")
    finally:
        fake_less.stop(0)


# --- retries ------------------------------------------------------------------------------


def test_no_retry_by_default(client, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "starting")]
    with pytest.raises(Unavailable):
        client.generate("hi")
    assert len(fake.calls) == 1


def test_retry_resends_unavailable_and_overloaded(server, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "starting"), (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")]
    with Client(server.address, timeout=10, retry=FAST_RETRY) as client:
        assert client.generate("hi").text == "abc"
    assert fake.methods() == ["Generate"] * 3


def test_retry_gives_up_after_its_attempts(server, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "down")] * 5
    with Client(server.address, timeout=10, retry=FAST_RETRY) as client, pytest.raises(Unavailable):
        client.embed("x")
    assert len(fake.calls) == 3


def test_retry_never_resends_other_errors(server, fake):
    fake.failures = [(grpc.StatusCode.INVALID_ARGUMENT, "top_k: must be >= 0"), (grpc.StatusCode.INTERNAL, "bug")]
    with Client(server.address, timeout=10, retry=FAST_RETRY) as client:
        with pytest.raises(InvalidRequest):
            client.generate("hi")
        with pytest.raises(ServerError):
            client.generate("hi")
    assert len(fake.calls) == 2


def test_stream_is_retried_before_its_first_token(server, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "starting"), (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")]
    with Client(server.address, timeout=10, retry=FAST_RETRY) as client:
        deltas = list(client.stream("hi", request_id="same"))
    assert [d.token_ids for d in deltas] == [[5], [6], [7], []]
    assert fake.methods() == ["GenerateStream"] * 3
    assert {call.request.request_id for call in fake.calls} == {"same"}


def test_stream_is_not_retried_after_a_token(server, fake):
    fake.fail_after_tokens = (1, grpc.StatusCode.UNAVAILABLE)
    received = []
    with Client(server.address, timeout=10, retry=FAST_RETRY) as client, pytest.raises(Unavailable):
        for delta in client.stream("hi"):
            received.append(delta)
    assert [d.token_ids for d in received] == [[5]] and len(fake.calls) == 1


def test_async_stream_retries_only_before_the_first_token(server, fake):
    async def use(client):
        fake.failures = [(grpc.StatusCode.UNAVAILABLE, "starting")]
        first = [d.token_ids async for d in client.stream("hi")]
        fake.fail_after_tokens = (2, grpc.StatusCode.RESOURCE_EXHAUSTED)
        second = []
        with pytest.raises(Overloaded):
            async for delta in client.stream("hi"):
                second.append(delta.token_ids)
        return first, second

    first, second = run_async(server.address, use, timeout=10, retry=FAST_RETRY)
    assert first == [[5], [6], [7], []] and second == [[5], [6]]
    assert fake.methods() == ["GenerateStream"] * 3  # one failed start + one success + one failed mid-stream


def test_retry_policy_is_validated_and_backs_off():
    with pytest.raises(ValueError):
        Retry(attempts=0)
    with pytest.raises(ValueError):
        Retry(initial_backoff_s=3, max_backoff_s=1)
    policy = Retry(initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2, jitter=0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])


# --- deadlines ----------------------------------------------------------------------------


def test_client_deadline_reaches_the_server_and_expires(server, fake):
    fake.stall = True
    with Client(server.address, timeout=0.3) as client, pytest.raises(DeadlineExceeded):
        client.generate("hi")
    assert 0 < fake.calls[0].time_remaining <= 0.3


def test_per_call_timeout_overrides_the_clients(server, fake):
    with Client(server.address, timeout=100) as client:
        client.tokenize("a", timeout=2)
        client.tokenize("a")
        client.tokenize("a", timeout=None)
    assert fake.calls[0].time_remaining <= 2 and 2 < fake.calls[1].time_remaining <= 101  # the wire rounds timeouts up
    assert fake.calls[2].time_remaining > 1e6  # no deadline


def test_retries_share_the_calls_deadline(server, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "down")] * 1000
    policy = Retry(attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.05, jitter=0)
    with Client(server.address, timeout=0.5, retry=policy) as client, pytest.raises((Unavailable, DeadlineExceeded)):
        client.generate("hi")
    assert 1 < len(fake.calls) <= 10


def test_async_deadline_expires(server, fake):
    fake.stall = True

    async def use(client):
        with pytest.raises(DeadlineExceeded):
            await client.generate("hi")
        with pytest.raises(DeadlineExceeded):
            [d async for d in client.stream("hi")]

    run_async(server.address, use, timeout=0.3)


# --- authentication and TLS ---------------------------------------------------------------


def test_bearer_token_is_sent_as_authorization_metadata(server, fake):
    with Client(server.address, token="s3cret") as client:
        client.generate("hi")
        list(client.stream("hi"))

    async def use(client):
        await client.embed("x")

    run_async(server.address, use, token="s3cret")
    assert [call.metadata["authorization"] for call in fake.calls] == ["Bearer s3cret"] * 3
    with Client(server.address) as client:
        client.tokenize("a")
    assert "authorization" not in fake.calls[-1].metadata


@pytest.fixture(scope="module")
def certificates():
    return {"server": self_signed_certificate("shardgate test server"), "client": self_signed_certificate("shardgate test client")}


def test_tls_with_the_servers_root_certificate(certificates, tmp_path):
    server_cert, server_key = certificates["server"]
    tls_server = start_fake_server(grpc.ssl_server_credentials([(server_key, server_cert)]))
    try:
        with Client(tls_server.address, timeout=10, tls=TLS(root_certificates=server_cert)) as client:
            assert client.generate("hi").text == "abc"
        (tmp_path / "ca.pem").write_bytes(server_cert)  # a path works as well as bytes
        assert run_async(tls_server.address, lambda c: c.tokenize("a"), timeout=10, tls=TLS(root_certificates=tmp_path / "ca.pem")) == [97]
        with Client(tls_server.address, timeout=2) as plaintext, pytest.raises(Unavailable):
            plaintext.generate("hi")
        other_ca, _ = certificates["client"]
        with Client(tls_server.address, timeout=2, tls=TLS(root_certificates=other_ca)) as untrusting, pytest.raises(Unavailable):
            untrusting.generate("hi")
    finally:
        tls_server.stop()


def test_mutual_tls_needs_the_client_certificate(certificates):
    server_cert, server_key = certificates["server"]
    client_cert, client_key = certificates["client"]
    credentials = grpc.ssl_server_credentials([(server_key, server_cert)], root_certificates=client_cert, require_client_auth=True)
    tls_server = start_fake_server(credentials)
    try:
        tls = TLS(root_certificates=server_cert, certificate_chain=client_cert, private_key=client_key, server_name="localhost")
        with Client(tls_server.address, timeout=10, tls=tls) as client:
            assert client.generate("hi").text == "abc"
        with Client(tls_server.address, timeout=2, tls=TLS(root_certificates=server_cert)) as anonymous, pytest.raises(Unavailable):
            anonymous.generate("hi")
    finally:
        tls_server.stop()
    with pytest.raises(ValueError, match="go together"):
        TLS(certificate_chain=client_cert)


# --- trace context ------------------------------------------------------------------------


@pytest.fixture
def server_spans(fake):
    """The fake opens a server span for each call, as a traced server would, from the incoming
    metadata with the W3C propagator; the spans are kept in memory."""
    from opentelemetry import propagate
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("fake-server")

    def on_call(method, context):
        parent = propagate.extract(dict(context.invocation_metadata()))
        tracer.start_span(f"server {method}", context=parent).end()

    fake.on_call = on_call
    return exporter


def test_trace_context_reaches_the_server_span(server, fake, server_spans):
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("caller")
    with Client(server.address, timeout=10) as client:
        with tracer.start_as_current_span("caller work") as span:
            client.generate("hi")
            list(client.stream("hi"))
        client.tokenize("untraced")

    async def use(client):
        with tracer.start_as_current_span("async caller work") as async_span:
            await client.embed("x")
        return async_span

    async_span = run_async(server.address, use, timeout=10)
    spans = {s.name: s for s in server_spans.get_finished_spans()}
    for name, caller in (("server Generate", span), ("server GenerateStream", span), ("server Embed", async_span)):
        server_span = spans.pop(name) if name != "server Embed" else spans["server Embed"]
        assert server_span.context.trace_id == caller.get_span_context().trace_id
        assert server_span.parent.span_id == caller.get_span_context().span_id
    assert "traceparent" in fake.calls[0].metadata and "traceparent" not in fake.calls[2].metadata
    assert spans["server Tokenize"].parent is None  # no caller span, no parent
