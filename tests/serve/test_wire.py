"""Field counts on the wire, before parsing: hostile bodies refused by count, valid ones of any size passed,
and bodies that are not protobuf left to the parser."""

from __future__ import annotations

import re

import numpy as np
import pytest

from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.wire import (MODEL_INFO_SCHEMA, OTHER_FIELDS, SMALL_BODY_BYTES, TooManyFields, check_fields,
                                 predict_schema)

SCHEMA = predict_schema(max_items=8192, max_metadata_entries=1024, max_tensor_dims=8)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def metadata_body(keys: int) -> bytes:
    return b"".join(field(6, field(1, str(i).encode())) for i in range(keys))


@pytest.mark.parametrize("body, message", [
    (field(1, field(2, b"\x01" * 15_000_000)), "a packed 'tensor.shape' of 15000000 bytes: more than 8 values"),
    (field(1, b"\x10\x01" * 100_000), "more than 8 occurrences of field 'tensor.shape'"),  # unpacked
    (metadata_body(1_500_000), "more than 1024 occurrences of field 'metadata'"),
    (field(2, b"\x0a\x00" * 8_000_000), "more than 8192 occurrences of field 'images'"),
    (field(2, b"\x0a\x00") * 100_000, "more than 64 occurrences of field 'images (the message)'"),
    (b"\x38\x01" * 100_000, "more than 64 occurrences of PredictRequest fields other than the repeated ones"),
])
def test_bodies_that_repeat_a_field_beyond_any_valid_request_are_refused(body, message):
    assert len(body) > SMALL_BODY_BYTES
    with pytest.raises(TooManyFields, match=re.escape(message)):
        check_fields(body, SCHEMA)


def test_the_bounds_are_counted_over_merged_occurrences_of_a_message():
    """protobuf merges repeated occurrences of a message field: 2 x 5 shape entries make a 10-entry shape."""
    half = field(1, field(2, b"\x01" * 5))
    padding = field(3, b"m" * SMALL_BODY_BYTES)  # the model name: makes the body big enough to be walked
    with pytest.raises(TooManyFields, match="'tensor.shape'"):
        check_fields(half + half + padding, SCHEMA)
    check_fields(half + padding, SCHEMA)


def test_valid_requests_of_any_size_pass_and_parse_alike():
    images = pb.PredictRequest(model="digits", request_id="r" * 200, top_k=3, metadata={f"k{i}": "v" for i in range(500)},
                               images=pb.EncodedImages(images=[bytes(4096)] * 64))
    batch = np.zeros((64, 1, 28, 28), np.float32)
    tensor = pb.PredictRequest(tensor=pb.Tensor(dtype="float32", shape=list(batch.shape), data=batch.tobytes()))
    most = pb.PredictRequest(images=pb.EncodedImages(images=[b"x" * 8] * 8192), metadata={str(i): "" for i in range(1024)})
    for request in (images, tensor, most):
        body = request.SerializeToString()
        assert len(body) > SMALL_BODY_BYTES
        check_fields(body, SCHEMA)
        assert pb.PredictRequest.FromString(body) == request


def test_small_bodies_are_not_walked():
    check_fields(b"\x38\x01" * (SMALL_BODY_BYTES // 2), SCHEMA)  # 32 K top_k fields: the parser's few ms
    check_fields(b"\x0a\x00" * OTHER_FIELDS * 2, MODEL_INFO_SCHEMA)


@pytest.mark.parametrize("body", [
    b"\xff" * (SMALL_BODY_BYTES + 1),                     # a tag whose varint never ends
    field(3, b"m" * SMALL_BODY_BYTES)[:-10],              # a length past the end
    b"\x0b" + bytes(SMALL_BODY_BYTES + 1),                # a group (wire type 3)
])
def test_bodies_that_are_not_protobuf_are_left_to_the_parser(body):
    check_fields(body, SCHEMA)
    with pytest.raises(Exception):
        pb.PredictRequest.FromString(body)
