"""Chunk counts of PNG files and segment counts of JPEG files, checked before Pillow opens them.

Pillow walks a PNG's chunks and a JPEG's segments in Python, holding the GIL: a small file of many empty
ancillary chunks costs seconds of parsing, and while decoder threads walk such files the event loop gets a
fraction of the interpreter (figures: docs/benchmarks.md, "image_structure: chunk-count attacks"). No camera,
scanner or image library writes more than a few dozen metadata chunks or segments, so :func:`check_structure`
walks the file's chunk headers (skipping each payload by its length) and refuses a file above the bounds below,
stopping at the first count over its bound. It leaves every other judgement (CRCs, truncation, pixel counts)
to Pillow and :mod:`oodguard.serve.inputs`.
"""

from __future__ import annotations

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: the most PNG chunks other than pixel data (IDAT) a file may hold: text, colour, time, EXIF chunks
MAX_PNG_METADATA_CHUNKS = 256
#: pixel data chunks a file may hold: this many, plus one per KiB of file (encoders write 8 to 64 KiB chunks)
PNG_IDAT_CHUNKS_BASE = 64
#: the most JPEG segments (and fill bytes) before the image data starts (start of scan): APPn, ICC profile
#: parts (up to 255), tables, comments
MAX_JPEG_SEGMENTS = 512


class TooManyChunks(ValueError):
    """The file holds more chunks or segments than any real image; the message says how many were allowed."""


def check_structure(blob: bytes) -> None:
    """Raise :class:`TooManyChunks` for a PNG or JPEG with more chunks or segments than the bounds above;
    other files, and PNG / JPEG that end early or are malformed, are left to Pillow."""
    if blob.startswith(PNG_SIGNATURE):
        _check_png(blob)
    elif blob.startswith(b"\xff\xd8"):
        _check_jpeg(blob)


def _check_png(blob: bytes) -> None:
    view = memoryview(blob)
    most_idat = PNG_IDAT_CHUNKS_BASE + len(blob) // 1024
    idat = other = 0
    pos, end = len(PNG_SIGNATURE), len(blob)
    while pos + 8 <= end:
        length = int.from_bytes(view[pos:pos + 4], "big")
        kind = bytes(view[pos + 4:pos + 8])
        if kind == b"IDAT":
            idat += 1
            if idat > most_idat:
                raise TooManyChunks(f"PNG holds more than {most_idat} pixel data chunks (IDAT) for its "
                                    f"{len(blob)} bytes; no encoder writes them that small")
        elif kind == b"IEND":
            return
        else:
            other += 1
            if other > MAX_PNG_METADATA_CHUNKS:
                raise TooManyChunks(f"PNG holds more than {MAX_PNG_METADATA_CHUNKS} chunks other than pixel data")
        pos += 12 + length  # length, type, payload, CRC


def _check_jpeg(blob: bytes) -> None:
    pos, end, steps = 2, len(blob), 0
    while pos + 4 <= end:
        steps += 1
        if steps > MAX_JPEG_SEGMENTS:
            raise TooManyChunks(f"JPEG holds more than {MAX_JPEG_SEGMENTS} segments before its image data")
        if blob[pos] != 0xFF:
            return  # malformed: Pillow reports it
        marker = blob[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker == 0xDA or marker == 0xD9:  # start of scan: the segments end here; end of image
            return
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(blob[pos + 2:pos + 4], "big")


__all__ = ["TooManyChunks", "check_structure", "MAX_PNG_METADATA_CHUNKS", "PNG_IDAT_CHUNKS_BASE", "MAX_JPEG_SEGMENTS"]
