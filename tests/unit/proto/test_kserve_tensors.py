"""KServe v2 tensor elements on the wire (proto/kserve_tensors.py): the raw forms tritonclient
writes and reads, and the typed contents."""

import struct

import pytest

from shardgate.proto import kserve_v2_pb2
from shardgate.proto.kserve_tensors import BOOL, BYTES, UINT32, decode_raw, encode_raw, num_elements, typed_values


def test_bytes_elements_are_a_little_endian_length_then_the_bytes():
    raw = encode_raw(BYTES, [b"hi", b"", "é".encode()])
    assert raw == b"\x02\x00\x00\x00hi" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"
    assert decode_raw(BYTES, raw) == [b"hi", b"", "é".encode()]
    assert decode_raw(BYTES, b"") == []


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b"\x05\x00\x00\x00abc", "runs past the end"),  # says 5 bytes, holds 3
        (b"\x01\x00\x00\x00a\x01\x00", "inside an element's length"),  # a second length cut short
    ],
)
def test_truncated_bytes_contents_are_refused(raw, problem):
    with pytest.raises(ValueError, match=problem):
        decode_raw(BYTES, raw)


def test_fixed_size_types_are_packed_little_endian():
    assert encode_raw(UINT32, [1, 2**32 - 1]) == struct.pack("<2I", 1, 2**32 - 1)
    assert decode_raw(UINT32, struct.pack("<3I", 7, 0, 9)) == [7, 0, 9]
    assert encode_raw(BOOL, [True, False]) == b"\x01\x00"
    assert decode_raw(BOOL, b"\x01\x00\x02") == [True, False, True]
    with pytest.raises(ValueError, match="not a multiple of 4"):
        decode_raw(UINT32, b"\x00\x00\x00")


def test_other_datatypes_are_refused_by_name():
    with pytest.raises(ValueError, match="unsupported datatype 'FP16'"):
        decode_raw("FP16", b"\x00\x00")
    with pytest.raises(ValueError, match="unsupported datatype 'INT8'"):
        encode_raw("INT8", [1])
    with pytest.raises(ValueError, match="unsupported datatype 'FP32'"):
        typed_values(kserve_v2_pb2.InferTensorContents(), "FP32")


def test_typed_contents_are_read_from_the_datatypes_field():
    contents = kserve_v2_pb2.InferTensorContents(bytes_contents=[b"a"], bool_contents=[True], uint_contents=[3], int_contents=[9])
    assert typed_values(contents, BYTES) == [b"a"]
    assert typed_values(contents, BOOL) == [True]
    assert typed_values(contents, UINT32) == [3]


def test_num_elements_is_the_product_of_the_shape():
    assert num_elements([1]) == num_elements([1, 1]) == num_elements([]) == 1
    assert num_elements([2, 3]) == 6
    assert num_elements([0]) == 0
