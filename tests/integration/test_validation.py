"""Every bad request gets INVALID_ARGUMENT naming the field, and the server keeps serving."""

import math

import grpc
import pytest

from shardgate.clients.errors import from_rpc_error
from shardgate.proto import inference_pb2

CASES = {
    "empty prompt": (dict(prompt=""), "prompt"),
    "no prompt at all": (dict(), "prompt"),
    "empty token ids": (dict(prompt_token_ids=inference_pb2.TokenIds(ids=[])), "prompt_token_ids"),
    "token id outside vocab": (dict(prompt_token_ids=inference_pb2.TokenIds(ids=[1, 10**6])), "prompt_token_ids"),
    "max_new_tokens 0": (dict(prompt="hi", max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens over limit": (dict(prompt="hi", max_new_tokens=100_000), "max_new_tokens"),
    "over the context": (dict(prompt="x" * 2040, max_new_tokens=64), "max_new_tokens"),
    "negative temperature": (dict(prompt="hi", temperature=-0.5), "temperature"),
    "nan temperature": (dict(prompt="hi", temperature=math.nan), "temperature"),
    "infinite temperature": (dict(prompt="hi", temperature=math.inf), "temperature"),
    "top_p zero": (dict(prompt="hi", top_p=0.0), "top_p"),
    "top_p above one": (dict(prompt="hi", top_p=1.5), "top_p"),
    "negative top_k": (dict(prompt="hi", top_k=-1), "top_k"),
    "empty stop string": (dict(prompt="hi", stop=["ok", ""]), "stop[1]"),
    "too many stop strings": (dict(prompt="hi", stop=["s"] * 17), "stop"),
    "request id too long": (dict(prompt="hi", request_id="r" * 300), "request_id"),
    "priority too high": (dict(prompt="hi", priority=101), "priority"),
}


def call(stub, method: str, **fields):
    fields.setdefault("max_new_tokens", 4)
    request = inference_pb2.GenerateRequest(**fields)
    if method == "Generate":
        return stub.Generate(request, timeout=30)
    return list(stub.GenerateStream(request, timeout=30))


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_invalid_argument_naming_the_field(stub, method, case):
    fields, field = CASES[case]
    with pytest.raises(grpc.RpcError) as raised:
        call(stub, method, **dict(fields))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}: "), raised.value.details()
    assert "Traceback" not in raised.value.details()
    assert from_rpc_error(raised.value).field == field  # the status's BadRequest detail names it too


def test_server_keeps_serving_after_bad_input(stub, client, tiny_server):
    for fields, _ in CASES.values():
        with pytest.raises(grpc.RpcError):
            call(stub, "Generate", **dict(fields))
    assert len(client.generate("still alive", max_new_tokens=3, ignore_eos=True).token_ids) == 3
    assert tiny_server.process.poll() is None


def test_message_over_the_size_limit_is_resource_exhausted(stub, client):
    # The server's default --max-message-bytes is 4 MiB.
    with pytest.raises(grpc.RpcError) as raised:
        call(stub, "Generate", prompt="x" * (5 << 20))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(client.generate("small is fine", max_new_tokens=2, ignore_eos=True).token_ids) == 2
