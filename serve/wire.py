"""Field counts of a request body, checked on its protobuf wire bytes before the body is parsed.

The gateway parses request bodies on its event loop. Parsing runs in C, but its cost grows with the number of
fields, not bytes: a body of millions of tiny fields takes a large part of a second to parse, and the loop
answers nobody meanwhile (figures: docs/benchmarks.md, "wire: field-count attacks"). No valid request repeats a
field more than a few thousand times, so :func:`check_fields` walks the field headers of the body (skipping
every payload by its length, never copying one) and refuses a body by count: it stops at the first field over
its bound, so the walk itself stays far cheaper than the parse it prevents. A body that is not valid protobuf is
left for the parser, which refuses it with its own message. Bodies up to :data:`SMALL_BODY_BYTES` are not
walked: they parse quickly whatever they hold, and the parsed request's own checks bound them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: bodies up to this size are parsed without a walk (at most 32 K fields: ~13 ms of parsing at worst)
SMALL_BODY_BYTES = 64 * 1024
#: the most occurrences of any field a message schema below does not bound (unknown fields included)
OTHER_FIELDS = 64

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class TooManyFields(ValueError):
    """The body repeats a field (or holds fields) above a bound; the message says which."""


@dataclass(frozen=True)
class Bound:
    """How often one field may occur in a body (over every occurrence of its message: protobuf merges repeated
    occurrences of a message field into one). ``inner``: the field's own message, walked too. ``packed_bytes``:
    the most bytes of one packed run of a repeated number field (each value takes 1 to 10 bytes)."""

    name: str
    most: int
    inner: "Schema | None" = None
    packed_bytes: int | None = None
    #: what ``most`` is, for the refusal's message
    why: str = "no valid request has more"


@dataclass(frozen=True)
class Schema:
    """The bounded fields of one message, by field number."""

    name: str
    fields: dict[int, Bound] = field(default_factory=dict)


def predict_schema(max_items: int, max_metadata_entries: int, max_tensor_dims: int) -> Schema:
    """The bounds of an ``oodguard.v1.PredictRequest`` (field numbers from ``oodguard.proto``); ``max_items``:
    the largest batch a served model takes."""
    tensor = Schema("Tensor", {2: Bound("tensor.shape", max_tensor_dims, packed_bytes=10 * max_tensor_dims,
                                        why="inputs have at most that many dimensions")})
    images = Schema("EncodedImages", {1: Bound("images", max_items, why="the largest batch a served model takes; "
                                                                       "split the request")})
    return Schema("PredictRequest", {1: Bound("tensor (the message)", OTHER_FIELDS, tensor),
                                     2: Bound("images (the message)", OTHER_FIELDS, images),
                                     6: Bound("metadata", max_metadata_entries, why="the metadata entry limit")})


MODEL_INFO_SCHEMA = Schema("ModelInfoRequest")


def check_fields(body: bytes | memoryview, schema: Schema) -> None:
    """Raise :class:`TooManyFields` when ``body`` holds a field more often than ``schema`` allows; return
    quietly for a body within its bounds or one that is not valid protobuf (the parser reports that)."""
    if len(body) <= SMALL_BODY_BYTES:
        return
    counts: dict[tuple[str, int], int] = {}
    try:
        _walk(memoryview(body), schema, counts)
    except _Malformed:
        return


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed()
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _count(counts: dict, schema: Schema, number: int, bound: Bound | None, add: int = 1) -> None:
    key = (schema.name, number if bound else -1)
    seen = counts.get(key, 0) + add
    counts[key] = seen
    most = bound.most if bound else OTHER_FIELDS
    if seen > most:
        what = f"field {bound.name!r}" if bound else f"{schema.name} fields other than the repeated ones"
        why = bound.why if bound else "no valid request has more"
        raise TooManyFields(f"request body holds more than {most} occurrences of {what} ({why})")


def _walk(buf: memoryview, schema: Schema, counts: dict, pos: int = 0, end: int | None = None) -> None:
    end = len(buf) if end is None else end
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        bound = schema.fields.get(number)
        if wire == _VARINT:
            _, pos = _varint(buf, pos, end)
            _count(counts, schema, number, bound)
        elif wire == _I64 or wire == _I32:
            pos += 8 if wire == _I64 else 4
            _count(counts, schema, number, bound)
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed()
            if bound is not None and bound.packed_bytes is not None:
                if size > bound.packed_bytes:
                    raise TooManyFields(f"request body holds a packed {bound.name!r} of {size} bytes: more than "
                                        f"{bound.most} values ({bound.why})")
                values = sum(1 for byte in buf[pos:pos + size] if byte < 0x80)
                _count(counts, schema, number, bound, values)
            else:
                _count(counts, schema, number, bound)
                if bound is not None and bound.inner is not None:
                    _walk(buf, bound.inner, counts, pos, pos + size)
            pos += size
        else:  # groups (3, 4) and undefined wire types: not protobuf this API speaks
            raise _Malformed()
        if pos > end:
            raise _Malformed()


__all__ = ["SMALL_BODY_BYTES", "TooManyFields", "Bound", "Schema", "check_fields", "predict_schema", "MODEL_INFO_SCHEMA", "OTHER_FIELDS"]
