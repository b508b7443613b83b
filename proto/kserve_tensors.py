"""KServe v2 tensor elements to and from their wire forms (kserve_v2.proto).

A tensor's elements travel either in the repeated field of its data type
(`InferTensorContents`) or as raw bytes (`raw_input_contents` / `raw_output_contents`,
which tritonclient uses): fixed-size types little-endian and packed, BYTES elements each as a
4-byte little-endian length followed by the bytes. Only the data types shardgate's LLM tensors
use are here (BYTES, BOOL, UINT32); shared by the gateway's KServe frontend and the bench's
KServe driver.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from shardgate.proto import kserve_v2_pb2

BYTES, BOOL, UINT32 = "BYTES", "BOOL", "UINT32"
DATATYPES = (BYTES, BOOL, UINT32)

_LENGTH = struct.Struct("<I")


def encode_raw(datatype: str, values: Sequence) -> bytes:
    """The raw wire form of a flat list of elements."""
    if datatype == BYTES:
        return b"".join(_LENGTH.pack(len(value)) + bytes(value) for value in values)
    if datatype == BOOL:
        return bytes(1 if value else 0 for value in values)
    if datatype == UINT32:
        return struct.pack(f"<{len(values)}I", *values)
    raise ValueError(f"unsupported datatype {datatype!r} (supported: {', '.join(DATATYPES)})")


def decode_raw(datatype: str, raw: bytes) -> list:
    """The elements of a raw tensor; ValueError if the bytes are not a whole number of them."""
    if datatype == BYTES:
        values, offset = [], 0
        while offset < len(raw):
            if offset + _LENGTH.size > len(raw):
                raise ValueError(f"BYTES contents end inside an element's length (byte {offset} of {len(raw)})")
            (length,) = _LENGTH.unpack_from(raw, offset)
            offset += _LENGTH.size
            if offset + length > len(raw):
                raise ValueError(f"BYTES element of {length} bytes runs past the end of the contents ({len(raw) - offset} left)")
            values.append(raw[offset : offset + length])
            offset += length
        return values
    if datatype == BOOL:
        return [byte != 0 for byte in raw]
    if datatype == UINT32:
        if len(raw) % 4:
            raise ValueError(f"UINT32 contents of {len(raw)} bytes are not a multiple of 4")
        return list(struct.unpack(f"<{len(raw) // 4}I", raw))
    raise ValueError(f"unsupported datatype {datatype!r} (supported: {', '.join(DATATYPES)})")


def typed_values(contents: kserve_v2_pb2.InferTensorContents, datatype: str) -> list:
    """The elements of a tensor sent in the repeated field of its data type."""
    if datatype == BYTES:
        return list(contents.bytes_contents)
    if datatype == BOOL:
        return list(contents.bool_contents)
    if datatype == UINT32:
        return list(contents.uint_contents)
    raise ValueError(f"unsupported datatype {datatype!r} (supported: {', '.join(DATATYPES)})")


def num_elements(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
