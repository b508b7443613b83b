"""The client library against an in-process fake server: every method, sync and async, and the
exception for each status (connection behaviour, retries and deadlines: test_connection.py)."""

from concurrent import futures

import grpc
import pytest
from fake_inference import STREAM_TOKENS

from shardgate.clients import (
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
    ServerError,
    ShardgateError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    build_request,
)


@pytest.fixture
def client(server):
    with Client(server.address, timeout=10) as client:
        yield client


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


CONVERSATION = [{"role": "system", "content": "Be brief."}, ("user", "Hi")]


def test_chat_sends_the_messages_and_returns_a_completion_or_deltas(client, fake):
    completion = client.chat(CONVERSATION, max_new_tokens=3, temperature=0)
    assert isinstance(completion, Completion) and completion.text == "abc"
    deltas = list(client.chat(CONVERSATION, stream=True, max_new_tokens=3))
    assert all(isinstance(d, Delta) for d in deltas) and "".join(d.text for d in deltas) == "abc" and deltas[-1].finish_reason == "length"
    assert fake.methods() == ["Generate", "GenerateStream"]
    for call in fake.calls:
        sent = call.request
        assert sent.WhichOneof("input") == "messages" and sent.max_new_tokens == 3
        assert [(m.role, m.content) for m in sent.messages.messages] == [("system", "Be brief."), ("user", "Hi")]
    # Parameters left unset stay unset: the server fills them with the model's defaults.
    assert fake.calls[0].request.HasField("temperature") and not fake.calls[1].request.HasField("temperature")
    assert not any(call.request.HasField(name) for call in fake.calls for name in ("top_p", "top_k"))


@pytest.mark.parametrize(
    "messages",
    [[], "hi", {"role": "user", "content": "hi"}, [{"role": "user"}], [("user",)], [{"role": "", "content": "x"}], [("user", 3)], ["hi"]],
    ids=["empty", "a string", "one dict", "no content", "a 1-tuple", "empty role", "non-string content", "a bare string"],
)
def test_malformed_chat_messages_are_refused_before_any_call(client, fake, messages):
    with pytest.raises(ValueError, match="messages"):
        client.chat(messages)
    with pytest.raises(ValueError, match="messages"):
        client.chat(messages, stream=True)
    assert fake.calls == []


def test_build_request_takes_exactly_one_prompt_form_and_sends_top_k_only_when_given():
    with pytest.raises(ValueError, match="exactly one of prompt and messages"):
        build_request("hi", messages=[("user", "hi")])
    with pytest.raises(ValueError, match="exactly one of prompt and messages"):
        build_request()
    assert not build_request("hi").HasField("top_k")
    explicit_off = build_request("hi", top_k=0)
    assert explicit_off.HasField("top_k") and explicit_off.top_k == 0


def test_tokenize_takes_chat_messages(client, fake):
    assert client.tokenize([("user", "a")]) == [ord(c) for c in "user:a\n"]
    assert fake.calls[0].request.WhichOneof("input") == "messages"


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


def test_async_client_covers_every_method(server, fake, run_async):
    async def use(client):
        completion = await client.generate("hi", max_new_tokens=3)
        deltas = [d async for d in client.stream("hi", max_new_tokens=3)]
        chat = await client.chat([("user", "hi")], max_new_tokens=3)
        chat_deltas = [d async for d in client.chat([("user", "hi")], stream=True, max_new_tokens=3)]
        chat_ids = await client.tokenize([("user", "hi")])
        embeddings = await client.embed(["ab"])
        ids = await client.tokenize("ab")
        info = await client.model_info()
        health = await client.health()
        bidi = client.bidi()
        await bidi.generate("x", "p", max_new_tokens=2)
        await bidi.generate("bad", "p", max_new_tokens=0)
        await bidi.done_writing()
        events = [e async for e in bidi]
        return completion, deltas, (chat, chat_deltas, chat_ids), embeddings, ids, info, health, events

    completion, deltas, chats, embeddings, ids, info, health, events = run_async(server.address, use, timeout=10)
    assert completion.text == "abc" and [d.token_ids for d in deltas] == [[5], [6], [7], []]
    chat, chat_deltas, chat_ids = chats
    assert chat.text == "abc" and [d.token_ids for d in chat_deltas] == [[5], [6], [7], []] and chat_ids == [ord(c) for c in "user:hi\n"]
    assert [c.request.WhichOneof("input") for c in fake.calls[2:5]] == ["messages", "messages", "messages"]
    assert embeddings.vectors == [[2, 0, 0, 0]] and ids == [97, 98] and info.model == "fake" and health == "SERVING"
    assert [(e.request_id, e.token_ids) for e in events if isinstance(e, Delta)] == [("x", [0]), ("x", [1]), ("x", [])]
    [failed] = [e for e in events if isinstance(e, RequestFailed)]
    assert failed.request_id == "bad" and isinstance(failed.error, InvalidRequest)
    assert fake.methods() == [
        "Generate",
        "GenerateStream",
        "Generate",
        "GenerateStream",
        "Tokenize",
        "Embed",
        "Tokenize",
        "ModelInfo",
        "GenerateBidi",
    ]


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
def test_async_client_maps_statuses_too(server, fake, code, run_async):
    fake.failures = [(code, "no")] * 3

    async def use(client):
        with pytest.raises(EXPECTED_EXCEPTION[code]):
            await client.generate("hi")
        with pytest.raises(EXPECTED_EXCEPTION[code]):
            [d async for d in client.stream("hi")]
        with pytest.raises(EXPECTED_EXCEPTION[code]):
            await client.embed("x")

    run_async(server.address, use)


def test_unimplemented_methods_raise_unimplemented():
    fake_less = grpc.server(futures.ThreadPoolExecutor(2))
    port = fake_less.add_insecure_port("127.0.0.1:0")
    fake_less.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as client, pytest.raises(Unimplemented):
            client.embed("x")
    finally:
        fake_less.stop(0)
