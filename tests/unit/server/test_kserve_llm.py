"""Triton's LLM tensor convention (server/kserve_llm.py): request tensors and sampling_parameters
become a GenerateRequest, every mistake is a status naming the input or key, and results become
response tensors."""

import json

import grpc
import pytest

from shardgate.proto import inference_pb2, kserve_v2_pb2
from shardgate.proto.kserve_tensors import BOOL, BYTES, UINT32, decode_raw, encode_raw
from shardgate.server.kserve_llm import (
    DEFAULT_MAX_TOKENS,
    FINAL_RESPONSE,
    empty_final_response,
    generate_request,
    infer_response,
    model_metadata,
    read_request,
)
from shardgate.server.request import FinishReason
from shardgate.server.validation import RequestError

MODEL = "builtin:tiny"


def request(raw: bool = True, model: str = MODEL, **inputs) -> kserve_v2_pb2.ModelInferRequest:
    """A request with these inputs (name=(datatype, value)), raw as tritonclient sends them or
    in typed contents."""
    message = kserve_v2_pb2.ModelInferRequest(model_name=model, id="r1")
    for name, (datatype, value) in inputs.items():
        tensor = message.inputs.add(name=name, datatype=datatype, shape=[1])
        if raw:
            message.raw_input_contents.append(encode_raw(datatype, [value]))
        elif datatype == BYTES:
            tensor.contents.bytes_contents.append(value)
        else:
            tensor.contents.bool_contents.append(value)
    return message


def refusal(message: kserve_v2_pb2.ModelInferRequest, streaming_call: bool = True) -> RequestError:
    with pytest.raises(RequestError) as error:
        read_request(message, MODEL, streaming_call)
    return error.value


def sampling(**parameters) -> tuple[str, bytes]:
    return (BYTES, json.dumps(parameters).encode())


@pytest.mark.parametrize("raw", [True, False])
def test_a_request_becomes_a_generate_request(raw):
    message = request(
        raw,
        text_input=(BYTES, "Héllo".encode()),
        sampling_parameters=sampling(max_tokens=5, temperature=0, top_p=0.5, top_k=3, seed=7, stop=["\n"], ignore_eos=True, priority=-2),
        return_num_output_tokens=(BOOL, True),
    )
    llm = read_request(message, MODEL, streaming_call=False)
    expected = dict(max_new_tokens=5, temperature=0, top_p=0.5, top_k=3, seed=7, stop=["\n"], ignore_eos=True, priority=-2)
    assert llm.generate == inference_pb2.GenerateRequest(request_id="r1", prompt="Héllo", **expected)
    assert (llm.stream, llm.echo_prompt, llm.empty_final_response) == (False, True, False)
    assert llm.outputs == ("text_output", "num_output_tokens")


def test_sampling_parameters_take_vllm_spellings():
    assert generate_request(None).max_new_tokens == DEFAULT_MAX_TOKENS
    as_strings = generate_request(json.dumps({"max_tokens": "100", "temperature": "0.1", "top_k": "-1", "ignore_eos": "true"}).encode())
    assert (as_strings.max_new_tokens, round(as_strings.temperature, 6), as_strings.top_k, as_strings.ignore_eos) == (100, 0.1, 0, True)
    assert generate_request(b'{"max_new_tokens": 3.0, "stop": "END", "timeout_ms": 500}') == inference_pb2.GenerateRequest(
        max_new_tokens=3, stop=["END"], timeout_ms=500
    )
    assert not generate_request(b"{}").HasField("temperature")  # unset stays unset: the model's default applies


@pytest.mark.parametrize(
    "parameters, message",
    [
        (b"{max_tokens: 3}", "sampling_parameters: not valid JSON"),
        (b"\xff", "sampling_parameters: not valid JSON"),
        (b"[1, 2]", "sampling_parameters: must be a JSON object, got list"),
        (b'{"n": 2}', "sampling_parameters: unknown key 'n' (known: max_tokens, max_new_tokens, temperature"),
        (b'{"max_tokens": 3, "max_new_tokens": 3}', "sampling_parameters: give max_tokens or max_new_tokens, not both"),
        (b'{"max_tokens": 2.5}', "sampling_parameters: max_tokens must be an integer, got 2.5"),
        (b'{"max_tokens": true}', "sampling_parameters: max_tokens must be an integer, got True"),
        (b'{"seed": -1}', "sampling_parameters: seed must be in [0, 18446744073709551615], got -1"),
        (b'{"priority": 4294967296}', "sampling_parameters: priority must be in [-2147483648, 2147483647]"),
        (b'{"temperature": "warm"}', "sampling_parameters: temperature must be a number, got 'warm'"),
        (b'{"temperature": null}', "sampling_parameters: temperature must be a number, got None"),
        (b'{"ignore_eos": "yes"}', "sampling_parameters: ignore_eos must be true or false, got 'yes'"),
        (b'{"stop": ["a", 1]}', "sampling_parameters: stop must be a string or a list of strings"),
    ],
)
def test_bad_sampling_parameters_are_invalid_naming_the_key(parameters, message):
    with pytest.raises(RequestError) as error:
        generate_request(parameters)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    "message, text",
    [
        (request(stream=(BOOL, True)), "text_input: required"),
        (request(text_input=(BYTES, b"\xff")), "text_input: not valid UTF-8"),
        (request(text_input=(BOOL, True)), "text_input: datatype must be BYTES, got 'BOOL'"),
        (request(text_input=(BYTES, b"x"), image=(BYTES, b"")), "inputs: unknown input 'image' (the model takes text_input, stream"),
        (
            request(text_input=(BYTES, b"x"), stream=(BOOL, True), exclude_input_in_output=(BOOL, False)),
            "exclude_input_in_output: must be true",
        ),
    ],
)
def test_bad_inputs_are_invalid_naming_the_input(message, text):
    error = refusal(message)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(error).startswith(text)


def test_tensor_layout_mistakes_are_invalid():
    two = request(text_input=(BYTES, b"x"))
    two.raw_input_contents[0] = encode_raw(BYTES, [b"a", b"b"])
    assert str(refusal(two)) == "text_input: must hold one element (shape [1], 2 elements given)"
    cut = request(text_input=(BYTES, b"x"))
    cut.raw_input_contents[0] = b"\x09\x00\x00\x00ab"
    assert str(refusal(cut)).startswith("text_input: BYTES element of 9 bytes runs past the end")
    missing_raw = request(text_input=(BYTES, b"x"), stream=(BOOL, True))
    del missing_raw.raw_input_contents[1]
    assert str(refusal(missing_raw)) == "raw_input_contents: 1 entries for 2 inputs (one per input, in order)"
    both = request(text_input=(BYTES, b"x"))
    both.inputs[0].contents.bytes_contents.append(b"y")
    assert str(refusal(both)).startswith("text_input: has contents while the request uses raw_input_contents")
    twice = request(text_input=(BYTES, b"x"))
    twice.inputs.add(name="text_input", datatype=BYTES, shape=[1])
    twice.raw_input_contents.append(encode_raw(BYTES, [b"y"]))
    assert str(refusal(twice)) == "text_input: given twice"


def test_another_model_or_version_is_not_found():
    error = refusal(request(model="gpt-5", text_input=(BYTES, b"x")))
    assert (error.code, str(error)) == (grpc.StatusCode.NOT_FOUND, f"model_name: unknown model 'gpt-5' (this server serves '{MODEL}')")
    versioned = request(text_input=(BYTES, b"x"))
    versioned.model_version = "1"
    assert read_request(versioned, MODEL, streaming_call=False).generate.prompt == "x"
    versioned.model_version = "3"
    assert refusal(versioned).code == grpc.StatusCode.NOT_FOUND


def test_streaming_only_on_the_stream_and_never_echoing_the_prompt():
    streamed = request(text_input=(BYTES, b"x"), stream=(BOOL, True), exclude_input_in_output=(BOOL, True))
    llm = read_request(streamed, MODEL, streaming_call=True)
    assert (llm.stream, llm.echo_prompt) == (True, False)
    assert str(refusal(streamed, streaming_call=False)) == "stream: must be false on ModelInfer (stream with ModelStreamInfer)"
    excluded = read_request(request(text_input=(BYTES, b"x"), exclude_input_in_output=(BOOL, True)), MODEL, streaming_call=False)
    assert not excluded.echo_prompt


def test_outputs_are_text_plus_those_asked_for():
    flags = {"return_finish_reason": (BOOL, True), "return_num_input_tokens": (BOOL, False), "return_num_output_tokens": (BOOL, True)}
    outputs = read_request(request(text_input=(BYTES, b"x"), **flags), MODEL, True).outputs
    assert outputs == ("text_output", "finish_reason", "num_output_tokens")
    named = request(text_input=(BYTES, b"x"))
    named.outputs.add(name="num_input_tokens")
    assert read_request(named, MODEL, True).outputs == ("num_input_tokens",)
    named.outputs.add(name="logits")
    assert str(refusal(named)).startswith("outputs: unknown output 'logits' (the model produces text_output, finish_reason")


def test_empty_final_responses_follow_the_request_parameter():
    message = request(text_input=(BYTES, b"x"))
    assert not read_request(message, MODEL, True).empty_final_response
    message.parameters["triton_enable_empty_final_response"].int64_param = 1  # only a bool counts
    assert not read_request(message, MODEL, True).empty_final_response
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    assert read_request(message, MODEL, True).empty_final_response


def test_responses_carry_the_outputs_raw_in_order_and_the_final_flag():
    flags = {"return_finish_reason": (BOOL, True), "return_num_input_tokens": (BOOL, True), "return_num_output_tokens": (BOOL, True)}
    llm = read_request(request(text_input=(BYTES, b"x"), **flags), MODEL, True)
    response = infer_response(llm, "wörld", 2, 6, FinishReason.EOS, final=False)
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "r1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("text_output", BYTES, [1]),
        ("finish_reason", BYTES, [1]),
        ("num_input_tokens", UINT32, [1]),
        ("num_output_tokens", UINT32, [1]),
    ]
    decoded = [decode_raw(o.datatype, raw) for o, raw in zip(response.outputs, response.raw_output_contents)]
    assert decoded == [["wörld".encode()], [b"stop"], [6], [2]]  # an end of sequence is vLLM's "stop"
    assert response.parameters[FINAL_RESPONSE].bool_param is False and response.parameters[FINAL_RESPONSE].HasField("bool_param")
    unfinished = infer_response(llm, "", 0, 6, None)
    assert decode_raw(BYTES, unfinished.raw_output_contents[1]) == [b"None"] and FINAL_RESPONSE not in unfinished.parameters
    final = empty_final_response(llm)
    assert (list(final.outputs), final.id, final.parameters[FINAL_RESPONSE].bool_param) == ([], "r1", True)


def test_model_metadata_describes_the_convention():
    metadata = model_metadata(MODEL)
    assert (metadata.name, list(metadata.versions)) == (MODEL, ["1"])
    assert [(t.name, t.datatype) for t in metadata.inputs] == [
        ("text_input", BYTES),
        ("stream", BOOL),
        ("sampling_parameters", BYTES),
        ("exclude_input_in_output", BOOL),
        ("return_finish_reason", BOOL),
        ("return_num_input_tokens", BOOL),
        ("return_num_output_tokens", BOOL),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("text_output", BYTES, [-1]),
        ("finish_reason", BYTES, [-1]),
        ("num_input_tokens", UINT32, [1]),
        ("num_output_tokens", UINT32, [-1]),
    ]
