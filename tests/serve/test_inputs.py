"""Input limits and conversion without gRPC: header checks before decoding, formats, sizes, quoting."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from oodguard.serve.inputs import (InputError, InputLimits, check_request_fields, decode_images, item_count,
                                   open_images, quote, tensor_input)
from oodguard.serve.v1 import oodguard_pb2 as pb


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 13000, height: int = 13000) -> bytes:
    """A tiny PNG whose header declares ``width x height`` RGB pixels (one row of data follows): decoding it
    would allocate width * height * 3 bytes before finding the data truncated."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + 3 * width), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", row) + png_chunk(b"IEND", b"")


def encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


class Served:
    """The parts of a ServedVersion that input conversion reads."""

    def __init__(self):
        from oodguard.preprocess import Preprocessing

        self.preprocessing = Preprocessing(1, 8, 8, (0.5,), (0.25,))
        self.input_shape = (1, 8, 8)
        self.max_batch = 64
        self.model, self.version = "digits", 1


def test_bomb_is_refused_from_its_header_before_decoding():
    data = bomb_png()
    assert len(data) < 1000
    request = pb.PredictRequest(images=pb.EncodedImages(images=[data]))
    with pytest.raises(InputError, match=r"image 0 declares 13000x13000 = 169000000 pixels; the limit is 16777216") as exc:
        open_images(request, Served(), InputLimits())
    assert exc.value.reason == "image_too_large"


def test_pixels_of_a_request_are_bounded_together():
    limits = InputLimits(max_image_pixels=100 * 100, max_request_pixels=3 * 100 * 100)
    image = encoded(np.zeros((100, 100), np.uint8), "PNG")
    assert len(open_images(pb.PredictRequest(images=pb.EncodedImages(images=[image] * 3)), Served(), limits)) == 3
    with pytest.raises(InputError, match="more than 30000 pixels together"):
        open_images(pb.PredictRequest(images=pb.EncodedImages(images=[image] * 4)), Served(), limits)
    big = encoded(np.zeros((101, 100), np.uint8), "PNG")
    with pytest.raises(InputError, match="declares 100x101 = 10100 pixels"):
        open_images(pb.PredictRequest(images=pb.EncodedImages(images=[big])), Served(), limits)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "WEBP"])
def test_only_png_and_jpeg_are_accepted(fmt):
    data = encoded(np.full((8, 8), 7, np.uint8), fmt)
    with pytest.raises(InputError, match="image 0 is not a PNG or JPEG image") as exc:
        open_images(pb.PredictRequest(images=pb.EncodedImages(images=[data])), Served(), InputLimits())
    assert exc.value.reason == "image_format"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_png_and_jpeg_decode_like_the_preprocessing(fmt):
    image = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))
    served = Served()
    request = pb.PredictRequest(images=pb.EncodedImages(images=[encoded(image, fmt)] * 2))
    x = decode_images(open_images(request, served, InputLimits()), served)
    assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32
    expected = served.preprocessing.apply(image[None])
    np.testing.assert_allclose(x[0], expected[0], atol=0.0 if fmt == "PNG" else 0.2)


def test_a_truncated_image_is_an_input_error_at_decoding():
    data = encoded(np.zeros((64, 64), np.uint8), "PNG")[:-30]
    images = open_images(pb.PredictRequest(images=pb.EncodedImages(images=[data])), Served(), InputLimits())
    with pytest.raises(InputError, match="image 0: cannot decode image"):
        decode_images(images, Served())


def test_uint8_tensors_obey_the_pixel_limits():
    limits = InputLimits(max_image_pixels=64, max_request_pixels=128)
    ok = np.zeros((2, 8, 8), np.uint8)
    assert tensor_input(pb.PredictRequest(tensor=pb.Tensor(dtype="uint8", shape=[2, 8, 8], data=ok.tobytes())),
                        Served(), limits).shape == (2, 1, 8, 8)
    three = np.zeros((3, 8, 8), np.uint8)
    with pytest.raises(InputError, match="images above the limit of 64 pixels each or 128 per request"):
        tensor_input(pb.PredictRequest(tensor=pb.Tensor(dtype="uint8", shape=[3, 8, 8], data=three.tobytes())),
                     Served(), limits)


def test_request_id_and_metadata_sizes():
    limits = InputLimits(max_request_id_bytes=8, max_metadata_bytes=10)
    check_request_fields(pb.PredictRequest(request_id="12345678", metadata={"ab": "cdefghij"}), limits)
    with pytest.raises(InputError, match="request_id is 9 bytes, above the limit of 8") as exc:
        check_request_fields(pb.PredictRequest(request_id="123456789"), limits)
    assert exc.value.reason == "request_id_too_long"
    with pytest.raises(InputError, match=r"metadata is 11 bytes \(keys and values\), above the limit of 10") as exc:
        check_request_fields(pb.PredictRequest(metadata={"ab": "cdefghijk"}), limits)
    assert exc.value.reason == "metadata_too_large"
    # multi-byte characters count as their UTF-8 bytes
    with pytest.raises(InputError, match="request_id is 10 bytes"):
        check_request_fields(pb.PredictRequest(request_id="ééééé"), limits)


def test_client_strings_in_errors_are_truncated():
    long = "x" * 1_000_000
    assert quote("abc") == "'abc'"
    assert quote(long) == repr("x" * 64) + "... (1000000 characters)"
    with pytest.raises(InputError) as exc:
        tensor_input(pb.PredictRequest(tensor=pb.Tensor(dtype=long, shape=[1, 1, 8, 8])), Served(), InputLimits())
    assert len(str(exc.value)) < 300


def test_item_count():
    assert item_count(pb.PredictRequest()) == 0
    assert item_count(pb.PredictRequest(images=pb.EncodedImages(images=[b"a", b"b"]))) == 2
    assert item_count(pb.PredictRequest(tensor=pb.Tensor(dtype="uint8", shape=[5, 8, 8]))) == 5
    assert item_count(pb.PredictRequest(tensor=pb.Tensor(dtype="uint8", shape=[-3, 8, 8]))) == 0


def text_bomb_png(chunks: int, inflated: int, kind: bytes = b"zTXt") -> bytes:
    """A 28x28 grey PNG whose header is followed by ``chunks`` compressed text chunks of ``inflated`` bytes
    each (a 1 MiB chunk compresses to about 1 KB)."""
    ihdr = png_chunk(b"IHDR", bytes.fromhex("0000001c0000001c0800000000"))
    text = zlib.compress(b"a" * inflated, 9)
    texts = b"".join(png_chunk(kind, f"k{i}".encode() + b"\0\0" + text) for i in range(chunks))
    return (b"\x89PNG\r\n\x1a\n" + ihdr + texts + png_chunk(b"IDAT", zlib.compress(bytes(29) * 28))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("chunks, inflated", [(63, 1_048_560), (40, 60_000)])
def test_png_text_chunks_are_bounded_while_the_header_is_read(chunks, inflated):
    """63 text chunks of 1 MiB each (66 KB on the wire; Pillow would inflate and keep 63 MiB per image while
    opening it), or many chunks each under the per-chunk limit: refused from the header, a bounded amount
    inflated, before anything is decoded."""
    import tracemalloc

    from oodguard.serve.inputs import MAX_PNG_TEXT_BYTES

    blob = text_bomb_png(chunks, inflated)
    assert len(blob) < 2_500_000
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=f"image 0 carries more than {MAX_PNG_TEXT_BYTES} bytes of PNG text") as info:
            open_images(pb.PredictRequest(images=pb.EncodedImages(images=[blob])), Served(), InputLimits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "image_too_large"
    assert peak < 8 * MAX_PNG_TEXT_BYTES + 4 * len(blob), peak  # never the megabytes the chunks inflate to


def test_a_little_png_text_is_still_accepted():
    request = pb.PredictRequest(images=pb.EncodedImages(images=[text_bomb_png(2, 1000)]))
    image, = open_images(request, Served(), InputLimits())
    assert image.size == (28, 28) and len(image.info) == 2


def test_thin_strips_are_refused_by_their_longest_side():
    """1 x 16,000,000 passes the per-image pixel limit (16,777,216) but not the side limit (4 x 4096): refused from
    the header (PNG) or the shape (uint8 tensor) before anything is resized; 16384 x 1 is still fine."""
    limits = InputLimits()
    assert limits.max_image_side == 16384
    ihdr = png_chunk(b"IHDR", struct.pack(">II", 16_000_000, 1) + bytes.fromhex("0800000000"))
    strip = b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    with pytest.raises(InputError, match="image 0 is 16000000x1: a side above 16384 pixels") as info:
        open_images(pb.PredictRequest(images=pb.EncodedImages(images=[strip])), Served(), limits)
    assert info.value.reason == "image_too_large"
    tensor = pb.Tensor(dtype="uint8", shape=[1, 1, 16_000_000], data=bytes(16_000_000))
    with pytest.raises(InputError, match=r"shape \[1, 1, 16000000\]: an image side above 16384") as info:
        tensor_input(pb.PredictRequest(tensor=tensor), Served(), limits)
    assert info.value.reason == "image_too_large"
    ok = encoded(np.zeros((1, 16384), np.uint8), "PNG")
    assert open_images(pb.PredictRequest(images=pb.EncodedImages(images=[ok])), Served(), limits)[0].size == (16384, 1)


def test_huge_repeated_and_map_fields_are_counted_before_they_are_walked():
    """A shape of 2 M entries and 20,000 metadata keys: refused from their counts (O(1)), with messages that name
    the counts (the walks that came first before, listing the shape or summing every key's bytes on the event
    loop, ended in other messages)."""
    limits = InputLimits()
    request = pb.PredictRequest(tensor=pb.Tensor(dtype="float32", shape=[1] * 2_000_000))
    with pytest.raises(InputError, match="tensor shape has 2000000 dimensions; inputs have at most 8"):
        tensor_input(request, Served(), limits)
    request = pb.PredictRequest(metadata={f"k{i}": "" for i in range(20_000)})
    with pytest.raises(InputError, match="metadata has 20000 entries; the limit is 1024") as info:
        check_request_fields(request, limits)
    assert info.value.reason == "metadata_too_large"
    small = pb.PredictRequest(metadata={f"k{i}": "" for i in range(100)})
    check_request_fields(small, limits)  # a modest map is still measured by its bytes, and fits
