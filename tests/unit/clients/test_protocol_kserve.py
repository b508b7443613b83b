"""The bench's KServe driver's message handling (clients/tools/protocol_kserve.py)."""

import json

import grpc

from shardgate.clients.errors import InvalidRequest, Overloaded, ServerError
from shardgate.clients.tools.protocol_kserve import output_tokens, stream_error, stream_request
from shardgate.proto import kserve_v2_pb2
from shardgate.proto.kserve_tensors import BOOL, BYTES, UINT32, decode_raw, encode_raw


def test_the_request_is_a_greedy_stream_asking_for_token_counts_and_an_empty_final_response():
    request = stream_request("m", "Hi", 8, ignore_eos=True)
    assert request.model_name == "m" and request.parameters["triton_enable_empty_final_response"].bool_param
    values = {t.name: decode_raw(t.datatype, raw)[0] for t, raw in zip(request.inputs, request.raw_input_contents)}
    assert values == {
        "text_input": b"Hi",
        "stream": True,
        "sampling_parameters": json.dumps({"max_tokens": 8, "temperature": 0, "ignore_eos": True}).encode(),
        "return_num_output_tokens": True,
    }
    assert [t.datatype for t in request.inputs] == [BYTES, BOOL, BYTES, BOOL]


def test_token_counts_are_read_raw_or_typed_and_zero_when_absent():
    response = kserve_v2_pb2.ModelInferResponse()
    response.outputs.add(name="text_output", datatype=BYTES, shape=[1])
    response.outputs.add(name="num_output_tokens", datatype=UINT32, shape=[1])
    response.raw_output_contents.extend([encode_raw(BYTES, [b"ab"]), encode_raw(UINT32, [3])])
    assert output_tokens(response) == 3
    typed = kserve_v2_pb2.ModelInferResponse()
    typed.outputs.add(name="num_output_tokens", datatype=UINT32, shape=[1]).contents.uint_contents.append(2)
    assert output_tokens(typed) == 2
    assert output_tokens(kserve_v2_pb2.ModelInferResponse()) == 0


def test_stream_errors_keep_their_status_code():
    error = stream_error("INVALID_ARGUMENT: max_new_tokens: must be in [1, 4096], got 0")
    assert isinstance(error, InvalidRequest) and error.details() == "max_new_tokens: must be in [1, 4096], got 0"
    assert isinstance(stream_error("RESOURCE_EXHAUSTED: queue full"), Overloaded)
    other = stream_error("in ensemble 'x': failed")  # another server's message, without a code
    assert isinstance(other, ServerError) and other.code() == grpc.StatusCode.UNKNOWN and other.details() == "in ensemble 'x': failed"
