"""Chunk and segment counts of PNG and JPEG files, walked before Pillow opens them."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from oodguard.serve.image_structure import (MAX_JPEG_SEGMENTS, MAX_PNG_METADATA_CHUNKS, PNG_IDAT_CHUNKS_BASE,
                                            TooManyChunks, check_structure)

from .test_inputs import encoded, png_chunk

IHDR = png_chunk(b"IHDR", bytes.fromhex("0000001c0000001c0800000000"))  # 28 x 28, 8-bit grey
PIXELS = zlib.compress(bytes(29) * 28)


def png(*middle: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + IHDR + b"".join(middle) + png_chunk(b"IEND", b"")


def test_a_flood_of_metadata_chunks_is_refused_at_the_first_over_the_bound():
    check_structure(png(png_chunk(b"prVt", b"") * (MAX_PNG_METADATA_CHUNKS - 1), png_chunk(b"IDAT", PIXELS)))  # + IHDR
    for count in (MAX_PNG_METADATA_CHUNKS + 1, 500_000):
        with pytest.raises(TooManyChunks, match=f"more than {MAX_PNG_METADATA_CHUNKS} chunks other than pixel data"):
            check_structure(png(png_chunk(b"prVt", b"") * count, png_chunk(b"IDAT", PIXELS)))


def test_pixel_data_chunks_are_bounded_by_the_file_size():
    """Empty IDAT chunks (12 bytes each) are allowed 64 plus one per KiB of file: 500,000 of them in 6 MB
    are not; real encoders' 8-64 KiB chunks always are."""
    flood = png(png_chunk(b"IDAT", b"") * 500_000, png_chunk(b"IDAT", PIXELS))
    most = PNG_IDAT_CHUNKS_BASE + len(flood) // 1024
    with pytest.raises(TooManyChunks, match=f"more than {most} pixel data chunks"):
        check_structure(flood)
    check_structure(png(png_chunk(b"IDAT", b"") * (PNG_IDAT_CHUNKS_BASE - 1), png_chunk(b"IDAT", PIXELS)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("shape", [(28, 28), (8, 8, 3), (2000, 1500, 3)])
def test_images_written_by_pillow_pass(fmt, shape):
    check_structure(encoded(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), fmt))


def test_a_flood_of_jpeg_segments_or_fill_bytes_is_refused():
    jpeg = encoded(np.zeros((8, 8), np.uint8), "JPEG")
    for filler in (b"\xff\xfe\x00\x02", b"\xff"):  # empty comments; fill bytes
        with pytest.raises(TooManyChunks, match=f"more than {MAX_JPEG_SEGMENTS} segments before its image data"):
            check_structure(jpeg[:2] + filler * 1_000_000 + jpeg[2:])
    check_structure(jpeg[:2] + b"\xff\xfe\x00\x02" * 100 + jpeg[2:])


@pytest.mark.parametrize("blob", [b"", b"\x89PNG\r\n\x1a\n", png()[:30], b"\xff\xd8\xff", b"GIF89a" + bytes(100)])
def test_short_malformed_and_other_files_are_left_to_pillow(blob):
    check_structure(blob)
