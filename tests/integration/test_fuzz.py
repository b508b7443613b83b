"""Fuzzing the public API with hypothesis: whatever arrives, the server stays up and every call
ends OK or with a documented status (never UNKNOWN/INTERNAL, never a hang); on a multiplexed
stream every request ends exactly once. 3,200 cases in all, on one shared server."""

from collections import Counter

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import start_server

from shardgate.proto import inference_pb2

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEWER = settings(FUZZ, max_examples=400)
"""For the calls that carry several requests or none to generate (bidi streams, Tokenize)."""
SERVICE = "/shardgate.v1.Inference/"
GENERATE, STREAM, EMBED, TOKENIZE, BIDI = (SERVICE + name for name in ("Generate", "GenerateStream", "Embed", "Tokenize", "GenerateBidi"))

CODES = {code.value[0]: code for code in grpc.StatusCode}
uint32 = st.integers(0, 2**32 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
texts = st.text(max_size=40) | st.text(max_size=3000).filter(lambda t: len(t) > 2000)


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("fuzz"),
        "--kv-cache-memory",
        str(32 << 20),
        "--max-new-tokens-limit",
        "6",
        "--max-batch-tokens",
        "512",
        "--embed-max-queue-delay-us",
        "0",
    )
    with grpc.insecure_channel(server.address) as channel:
        yield channel
    assert server.process.poll() is None, "the server died"
    server.stop()


def call(channel, method: str, payload: bytes) -> grpc.StatusCode:
    try:
        if method == STREAM:
            list(channel.unary_stream(method)(payload, timeout=60))
        elif method == BIDI:
            list(channel.stream_stream(method)(iter([payload]), timeout=60))
        else:
            channel.unary_unary(method)(payload, timeout=60)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        assert "Traceback" not in (error.details() or "")
        status = rpc_status.from_call(error)
        check_details(error.code(), error.details(), status.details if status else [])
        return error.code()


def check_details(code: grpc.StatusCode, message: str, details) -> None:
    """A refusal's machine-readable details: INVALID_ARGUMENT names the field its message starts
    with, RESOURCE_EXHAUSTED says when to retry."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad_request = error_details_pb2.BadRequest()
        assert len(details) == 1 and details[0].Unpack(bad_request), message
        assert message.startswith(bad_request.field_violations[0].field + ": ")
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and not message.startswith("Received message larger than max"):
        assert len(details) == 1 and details[0].Unpack(error_details_pb2.RetryInfo()), message


REQUEST_IDS = st.text(max_size=300)


@st.composite
def generate_messages(draw, request_ids=REQUEST_IDS) -> inference_pb2.GenerateRequest:
    message = inference_pb2.GenerateRequest(
        request_id=draw(request_ids),
        max_new_tokens=draw(st.integers(0, 8) | uint32),
        top_k=draw(st.integers(-3, 100) | int32),
        stop=draw(st.lists(st.text(max_size=300), max_size=30)),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.booleans()),
        priority=draw(st.integers(-120, 120) | int32),
        timeout_ms=draw(st.sampled_from([0, 0, 1, 5, 10_000]) | uint32),
    )
    input_kind = draw(st.sampled_from(["prompt", "token ids", "messages"]))
    if input_kind == "prompt":
        message.prompt = draw(texts)
    elif input_kind == "token ids":
        message.prompt_token_ids.ids.extend(draw(st.lists(st.integers(0, 300) | uint32, max_size=50)))
    else:
        message.messages.CopyFrom(draw(chat_messages))
    for name in ("temperature", "top_p"):
        if draw(st.booleans()):
            setattr(message, name, draw(floats))
    if draw(st.booleans()):
        message.seed = draw(st.integers(0, 2**64 - 1))
    return message


roles = st.sampled_from(["system", "user", "assistant", "tool"]) | st.text(max_size=12)
chat_messages = st.builds(
    lambda pairs: inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in pairs]),
    st.lists(st.tuples(roles, texts), max_size=6),
)


def generate_requests() -> st.SearchStrategy[bytes]:
    return generate_messages().map(lambda message: message.SerializeToString())


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2); payload may be any bytes, UTF-8 or not."""
    length, out = len(payload), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(out) + payload


@given(payload=generate_requests(), stream=st.booleans())
@FUZZ
def test_structured_generate_requests(channel, payload, stream):
    assert call(channel, STREAM if stream else GENERATE, payload) in DOCUMENTED


@given(
    kind=st.sampled_from(["raw", "bad utf-8"]),
    data=st.binary(max_size=200),
    number=st.sampled_from([1, 2, 9]),
    method=st.sampled_from([GENERATE, STREAM, EMBED, TOKENIZE, BIDI]),
)
@FUZZ
def test_raw_bytes_and_invalid_utf8(channel, kind, data, number, method):
    payload = data if kind == "raw" else field(number, b"\xff\xfe" + data) + b"\x20\x04"
    assert call(channel, method, payload) in DOCUMENTED


@given(
    inputs=st.lists(texts, max_size=80),
    pooling=st.integers(0, 7),
    normalize=st.booleans(),
    priority=st.integers(-120, 120),
    timeout_ms=st.sampled_from([0, 1, 10_000]),
)
@FUZZ
def test_embed_requests(channel, inputs, pooling, normalize, priority, timeout_ms):
    message = inference_pb2.EmbedRequest(inputs=inputs, normalize=normalize, priority=priority, timeout_ms=timeout_ms)
    payload = message.SerializeToString() + bytes([3 << 3]) + bytes([pooling])  # pooling may be an unknown enum value
    assert call(channel, EMBED, payload) in DOCUMENTED


@given(
    text=texts,
    messages=st.none() | chat_messages,
    add_special_tokens=st.booleans(),
)
@FEWER
def test_tokenize_requests(channel, text, messages, add_special_tokens):
    message = inference_pb2.TokenizeRequest(add_special_tokens=add_special_tokens)
    if messages is None:
        message.text = text
    else:
        message.messages.CopyFrom(messages)
    assert call(channel, TOKENIZE, message.SerializeToString()) in DOCUMENTED


bidi_ids = st.sampled_from(["a", "b", "c", ""])
"""Few ids, so that requests reuse one another's ids (live or ended) and cancels find them."""
bidi_actions = st.lists(
    st.one_of(
        generate_messages(bidi_ids).map(lambda m: inference_pb2.GenerateBidiRequest(generate=m)),
        bidi_ids.map(lambda rid: inference_pb2.GenerateBidiRequest(cancel=inference_pb2.CancelGeneration(request_id=rid))),
        st.just(inference_pb2.GenerateBidiRequest()),  # no action
    ),
    max_size=8,
)


@given(actions=bidi_actions)
@FEWER
def test_bidi_streams_end_every_request_exactly_once(channel, actions):
    serialize, parse = inference_pb2.GenerateBidiRequest.SerializeToString, inference_pb2.GenerateBidiResponse.FromString
    stub = channel.stream_stream(BIDI, request_serializer=serialize, response_deserializer=parse)
    try:
        responses = list(stub(iter(actions), timeout=60))
    except grpc.RpcError as error:
        assert error.code() in DOCUMENTED and "Traceback" not in (error.details() or "")
        status = rpc_status.from_call(error)
        check_details(error.code(), error.details(), status.details if status else [])
        return
    ended = Counter()
    for response in responses:
        if response.WhichOneof("event") == "error":
            assert response.error.code in {code.value[0] for code in DOCUMENTED - {grpc.StatusCode.OK}}, response.error
            check_details(CODES[response.error.code], response.error.message, response.error.details)
            ended[response.error.request_id] += 1
        elif response.message.finish_reason:
            ended[response.message.request_id] += 1
    # One end per generate action (a refused one included), one error per message with no action.
    expected = Counter(a.generate.request_id for a in actions if a.WhichOneof("action") == "generate")
    expected[""] += sum(1 for a in actions if a.WhichOneof("action") is None)
    assert +ended == +expected
