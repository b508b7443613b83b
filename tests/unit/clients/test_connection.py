"""How the client connects and calls, against an in-process fake server (a real gRPC server on
127.0.0.1 that fails the calls it is told to and records every attempt): retries by gRPC's
service-config policy (only UNAVAILABLE and RESOURCE_EXHAUSTED, only before the first answer,
never a bidi stream, with growing waits, within the call's deadline), deadlines, TLS, bearer
token and trace-context injection."""

import time

import grpc
import pytest
from fake_inference import self_signed_certificate, start_fake_server

from shardgate.clients import (
    TLS,
    Client,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    Retry,
    ServerError,
    Unavailable,
)
from shardgate.clients.connection import MAX_ATTEMPTS, RETRYABLE_CODES
from shardgate.clients.errors import error_for

FAST_RETRY = Retry(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


@pytest.fixture
def client(server):
    with Client(server.address, timeout=10) as client:
        yield client


@pytest.fixture
def attempt_times(fake):
    """When each attempt reached the server (time.monotonic())."""
    times = []
    fake.on_call = lambda method, context: times.append(time.monotonic())
    return times


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


def test_async_retries_only_before_the_first_token(server, fake, run_async):
    async def use(client):
        fake.failures = [(grpc.StatusCode.UNAVAILABLE, "starting"), (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")]
        assert (await client.embed("x")).vectors == [[1, 0, 0, 0]]
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
    assert fake.methods() == ["Embed"] * 3 + ["GenerateStream"] * 3  # one failed start + one success + one failed mid-stream


def test_bidi_is_never_retried(server, fake, run_async):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "starting")] * 2
    with Client(server.address, timeout=10, retry=FAST_RETRY) as client, pytest.raises(Unavailable):
        with client.bidi() as stream:
            stream.done_writing()
            list(stream)

    async def use(client):
        stream = client.bidi()
        await stream.done_writing()
        with pytest.raises(Unavailable):
            [event async for event in stream]

    run_async(server.address, use, timeout=10, retry=FAST_RETRY)
    assert fake.methods() == ["GenerateBidi"] * 2


def test_a_request_beyond_grpcs_default_retry_buffer_is_retried_too(server, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "starting")]
    prompt = "a" * (300 << 10)  # gRPC keeps 256 KiB per call for re-sending unless told more
    with Client(server.address, timeout=10, retry=FAST_RETRY) as client:
        assert client.generate(prompt).text == "abc"
    assert len(fake.calls) == 2 and fake.calls[1].request.prompt == prompt


def test_waits_grow_by_the_multiplier_up_to_the_longest(server, fake, attempt_times):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "down")] * 5
    policy = Retry(attempts=4, initial_backoff_s=0.1, max_backoff_s=0.2, multiplier=4)
    with Client(server.address, timeout=10, retry=policy) as client, pytest.raises(Unavailable):
        client.generate("hi")
    waits = [later - earlier for earlier, later in zip(attempt_times, attempt_times[1:])]
    assert len(waits) == 3  # gRPC scales each wait by a random factor in [0.8, 1.2]
    assert 0.08 <= waits[0] and 0.16 <= waits[1] and 0.16 <= waits[2] < 1.0  # uncapped, the third would be >= 1.28


def test_retryable_exceptions_are_the_retried_statuses():
    retried = {code for code in grpc.StatusCode if code.name in RETRYABLE_CODES}
    assert retried == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert {code for code in grpc.StatusCode if error_for(code, "").retryable} - {grpc.StatusCode.OK} == retried


def test_retry_policy_is_validated_and_becomes_a_service_config():
    for bad in (dict(attempts=0), dict(attempts=MAX_ATTEMPTS + 1), dict(initial_backoff_s=0), dict(initial_backoff_s=3, max_backoff_s=1)):
        with pytest.raises(ValueError):
            Retry(**bad)
    with pytest.raises(ValueError):
        Retry(multiplier=0.5)
    assert Retry(attempts=1).service_config() is None
    config = Retry(attempts=MAX_ATTEMPTS, initial_backoff_s=0.25, max_backoff_s=1.5, multiplier=3).service_config()
    retried, bidi = config["methodConfig"]
    assert retried["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.250000000s",
        "maxBackoff": "1.500000000s",
        "backoffMultiplier": 3,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    assert retried["name"] == [{"service": "shardgate.v1.Inference"}, {"service": "grpc.health.v1.Health"}]
    assert bidi == {"name": [{"service": "shardgate.v1.Inference", "method": "GenerateBidi"}]}  # no policy: not retried


# --- deadlines ----------------------------------------------------------------------------


def test_client_deadline_reaches_the_server_and_expires(server, fake):
    fake.stall = True
    with Client(server.address, timeout=0.3) as client, pytest.raises(DeadlineExceeded):
        client.generate("hi")
    # gRPC rounds the timeout it puts on the wire up (grpc-timeout has a few significant digits), so
    # the server may see a hair more than the client asked for.
    assert 0 < fake.calls[0].time_remaining <= 0.32


def test_per_call_timeout_overrides_the_clients(server, fake):
    with Client(server.address, timeout=100) as client:
        client.tokenize("a", timeout=2)
        client.tokenize("a")
        client.tokenize("a", timeout=None)
    assert fake.calls[0].time_remaining <= 2.05 and 2.05 < fake.calls[1].time_remaining <= 101  # the wire rounds timeouts up
    assert fake.calls[2].time_remaining > 1e6  # no deadline


def test_retries_share_the_calls_deadline(server, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "down")] * MAX_ATTEMPTS
    policy = Retry(attempts=MAX_ATTEMPTS, initial_backoff_s=0.3, max_backoff_s=0.3, multiplier=1)
    start = time.monotonic()
    with Client(server.address, timeout=0.47, retry=policy) as client, pytest.raises(DeadlineExceeded):
        client.generate("hi")  # gRPC waits out the backoff and ends the call at its deadline
    assert 0.45 < time.monotonic() - start < 1.5
    # Each wait is at least 0.8 × 0.3 s: the second attempt starts by 0.36 s, a third could not before 0.48 s.
    assert len(fake.calls) == 2
    first, second = fake.calls
    assert first.time_remaining <= 0.48 and second.time_remaining <= first.time_remaining - 0.2  # the same deadline, later


def test_async_deadline_expires(server, fake, run_async):
    fake.stall = True

    async def use(client):
        with pytest.raises(DeadlineExceeded):
            await client.generate("hi")
        with pytest.raises(DeadlineExceeded):
            [d async for d in client.stream("hi")]

    run_async(server.address, use, timeout=0.3)


# --- authentication and TLS ---------------------------------------------------------------


def test_bearer_token_is_sent_as_authorization_metadata(server, fake, run_async):
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


def test_tls_with_the_servers_root_certificate(certificates, tmp_path, run_async):
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


def test_trace_context_reaches_the_server_span(server, fake, server_spans, run_async):
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
