#!/usr/bin/env python
"""Hostile inputs: an adversarial run against a real ``oodguard serve`` subprocess.

Five parts, the first four against one gateway (embedded ONNX Runtime, a SQLite queue and a metrics port in a temp folder;
a second gateway that requires a bearer token serves the authentication kinds unless --no-auth-gateway):

1. **Kinds**: more than 40 kinds of hostile request, one call each: decompression bombs (a hand-built PNG whose
   header declares 13000x13000 pixels, a JPEG whose SOF declares 65000x65000, 64 bombs in one request), other
   formats (BMP, TIFF, GIF, WEBP), broken or odd PNG/JPEG (truncated, bad CRC, a huge zTXt/iCCP chunk, a flood
   of chunks or markers before the pixels, 1x1, 1x100000, 16-bit, palette, CMYK), absurd float32 tensors (NaN,
   +-Inf, +-3e38, 1e3, noise x1e4, zeros, denormals), bad dtypes, shapes, byte lengths and batch sizes, bodies
   that are not a PredictRequest (garbage, truncated, invalid UTF-8, deep nesting), oversized request ids,
   metadata, model names and messages, absurd versions and top_k, ModelInfo with a garbage body, calls without
   or with a wrong token. Each is recorded as (kind, gRPC code, details, ms); an OK answer records whether every
   item came back with decision.ood true (and the reasons). After every kind the gateway's gRPC health must be
   SERVING and a good request (a PNG) must succeed.
2. **Bomb memory**: the gateway's peak RSS (VmHWM, reset through /proc/PID/clear_refs where the kernel allows,
   and VmRSS sampled every few ms) while 3 bomb requests run at once (repeated --bomb-rounds times), then while
   8 requests of 64 bombs each do; 12 good requests (PNG and uint8 tensor, 10 s deadline) go out during each
   phase, and their errors and deadline misses are counted (target: 0).
3. **Burst**: --burst concurrent requests of --burst-items noise PNGs from one ``grpc.aio`` channel, counting the
   codes (OK / RESOURCE_EXHAUSTED / other), the gateway's peak RSS, the time until every refused call had its
   answer; meanwhile good requests on another channel (retrying "overloaded" RESOURCE_EXHAUSTED with backoff
   inside their 10 s deadline, as a well-behaved client does) count their errors. Then /metrics is scraped:
   ``oodguard_requests_total`` summed by code over the burst window must equal what the client saw.

4. **The last attack's vectors** (issue 29): PNG text-chunk bombs (16 and 64 images of 63 x 1 MiB zTXt), a
   packed shape of 15 M entries, 1.4 M distinct metadata keys, 8 M empty ``images`` entries, a 1 x 16,000,000
   PNG and uint8 tensor, a PNG of 500,000 empty chunks: each sent by 1 sender, then by 4 at once, while good
   traffic runs on a connection of its own. Targets: gateway RSS growth < 512 MB, every hostile call answered
   within 15 s with INVALID_ARGUMENT / RESOURCE_EXHAUSTED, good traffic never slower than 1 s (its quiet p99 is
   printed beside it).
5. **Redis paused** (SIGSTOP, --redis-pause-s, default 8 s) under flagged traffic to a third gateway with a
   Redis queue: flagged p99 during the pause < 1 s, every acknowledged record id stored exactly once.

Prints a markdown table (kind | code | details | ms | healthy after) and the memory / burst summary on stdout,
progress on stderr, and writes report.json and report.md to --out. Exit status 0 when every check passed
(allowed codes, absurd inputs never answered in-distribution, healthy after every kind, no good-traffic
error, metrics equal to the client's counts), 1 otherwise.

    python bench/hostile_inputs.py [--repository DIR] [--out DIR] [--burst N] [--burst-items N]

Every process started here is stopped by its PID on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from oodguard.clients.gateway_process import GatewayProcess, environment, free_port

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "oodguard.v1.OODGuard"
#: codes a hostile kind may get; OK only when every item is flagged (decision.ood) for the kinds that must be
ALLOWED_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "OK")
GOOD_DEADLINE_S = 10.0
CALL_TIMEOUT_S = 60.0
AUTH_TOKEN = "hostile-bench-token"
DETAILS_CUT = 80
#: the client's receive limit: above the gateway's send limit, so that every reply it sends is read
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.max_send_message_length", -1)]
MiB = 1024 * 1024


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository to serve (default: the digits demo, "
                        "exported with `oodguard export --demo digits` into a temp folder, about 15 s)")
    parser.add_argument("--model", default="", help="model to send to (default: the gateway's only model)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "hostile-report",
                        help="folder for report.json and report.md (default %(default)s)")
    parser.add_argument("--burst", type=int, default=2000,
                        help="concurrent requests of the burst (default %(default)s)")
    parser.add_argument("--burst-items", type=int, default=16, help="noise PNG images per burst request "
                        "(default %(default)s)")
    parser.add_argument("--bomb-rounds", type=int, default=5, help="bomb-memory phases: each of the 8 concurrent "
                        "senders of 64 bombs sends at least this many requests, each of the 3 senders of one bomb 4x "
                        "as many; both go on while the good requests run (default %(default)s)")
    parser.add_argument("--good-requests", type=int, default=12, help="good requests sent during each bomb-memory "
                        "phase, PNG and uint8 alternately (default %(default)s)")
    parser.add_argument("--vector-rounds", type=int, default=3, help="attack-vectors part: each sender sends each "
                        "vector this many times, 1 sender then 4 at once (default %(default)s)")
    parser.add_argument("--quiet-seconds", type=float, default=3.0, help="attack-vectors part: seconds of good "
                        "traffic alone first, its latency the reference (default %(default)s)")
    parser.add_argument("--redis-pause-s", type=float, default=8.0, help="seconds Redis is paused (SIGSTOP) under "
                        "flagged traffic to a third gateway with a Redis queue; 0 = skip that part; skipped "
                        "too without redis-server on PATH (default %(default)s)")
    parser.add_argument("--no-auth-gateway", action="store_true", help="skip the second gateway (started with "
                        "--auth-token-file) and its UNAUTHENTICATED kinds")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="FLAG[=VALUE]",
                        help="extra `oodguard serve` flag for both gateways, repeatable "
                        "(e.g. --serve-arg=--max-inflight-requests=64); default: the gateway's own defaults")
    parser.add_argument("--work", type=Path, help="keep gateway logs, queue files and the exported repository in "
                        "this folder (default: a temp folder removed at the end)")
    args = parser.parse_args(argv)
    if min(args.burst, args.burst_items, args.bomb_rounds, args.good_requests, args.vector_rounds) < 1:
        parser.error("--burst, --burst-items, --bomb-rounds, --good-requests and --vector-rounds must be >= 1")
    if args.quiet_seconds <= 0 or args.redis_pause_s < 0:
        parser.error("--quiet-seconds must be > 0 and --redis-pause-s >= 0")
    return args


# -- hand-built inputs ------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, encoded by hand (any bytes, valid UTF-8 or not)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_by_hand(width: int, height: int, idat: bytes, *, bit_depth: int = 8, color_type: int = 0,
                before_idat: bytes = b"", ihdr_crc: int | None = None) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (PNG_MAGIC + png_chunk(b"IHDR", ihdr, ihdr_crc) + before_idat + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def zeros_deflated(total: int, block: int = 1 << 20) -> bytes:
    """zlib stream of ``total`` zero bytes, compressed block by block (never held uncompressed)."""
    c = zlib.compressobj(9)
    zero = bytes(block)
    parts = [c.compress(zero) for _ in range(total // block)]
    parts += [c.compress(bytes(total % block)), c.flush()]
    return b"".join(parts)


def png_bomb(width: int = 13000, height: int = 13000) -> bytes:
    """A complete, valid 8-bit grayscale PNG of ``width x height`` black pixels: ~160 KB on the wire, 169 MB
    (13000 x 13000) once decoded."""
    c = zlib.compressobj(9)
    rows = bytes(width + 1) * 100  # filter byte 0 + a row of zeros, 100 rows a call
    parts = [c.compress(rows) for _ in range(height // 100)]
    parts += [c.compress(bytes(width + 1) * (height % 100)), c.flush()]
    return png_by_hand(width, height, b"".join(parts))


def pil_bytes(image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def jpeg_with_sof(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose SOF0 segment is patched to declare ``width x height``."""
    from PIL import Image

    data = bytearray(pil_bytes(Image.new("L", (8, 8), 128), "JPEG"))
    at = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)  # marker(2) length(2) precision(1) height(2) width(2)
    return bytes(data)


class Inputs:
    """Every input the run sends, built once (the bombs take about half a second)."""

    def __init__(self, model: str, shape: tuple[int, ...], seed: int = 0):
        from PIL import Image

        self.model, self.shape = model, tuple(shape)  # per item [C, H, W]
        self.rng = np.random.default_rng(seed)
        _, h, w = self.shape
        self.noise_u8 = self.rng.integers(0, 256, (h, w), dtype=np.uint8)
        self.noise_png = pil_bytes(Image.fromarray(self.noise_u8), "PNG")
        self.noise_pngs = [pil_bytes(Image.fromarray(self.rng.integers(0, 256, (h, w), dtype=np.uint8)), "PNG")
                           for _ in range(8)]
        self.noise_rgb = Image.fromarray(self.rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        started = time.perf_counter()
        self.png_bomb = png_bomb(13000, 13000)
        self.jpeg_bomb = jpeg_with_sof(65000, 65000)
        log(f"bombs built: PNG 13000x13000 in {len(self.png_bomb) / 1024:.0f} KB, JPEG 65000x65000 in "
            f"{len(self.jpeg_bomb)} bytes ({time.perf_counter() - started:.1f}s)")

    # requests -----------------------------------------------------------------------------------
    def request(self, **fields):
        from oodguard.serve.v1 import oodguard_pb2 as pb

        fields.setdefault("model", self.model)
        return pb.PredictRequest(**fields)

    def images(self, blobs: list[bytes], **fields):
        from oodguard.serve.v1 import oodguard_pb2 as pb

        return self.request(images=pb.EncodedImages(images=blobs), **fields)

    def tensor(self, dtype: str, shape, data: bytes, **fields):
        from oodguard.serve.v1 import oodguard_pb2 as pb

        return self.request(tensor=pb.Tensor(dtype=dtype, shape=list(shape), data=data), **fields)

    def floats(self, values: np.ndarray, **fields):
        values = np.ascontiguousarray(values, dtype="<f4")
        return self.tensor("float32", values.shape, values.tobytes(), **fields)

    def float_batch(self, fill, batch: int = 2):
        x = np.empty((batch, *self.shape), np.float32)
        x[...] = fill
        return self.floats(x)

    def good_png(self):
        return self.images([self.noise_png])

    def good_uint8(self):
        return self.tensor("uint8", [1, *self.noise_u8.shape], self.noise_u8.tobytes())


# -- the hostile kinds ----------------------------------------------------------------------------
@dataclass
class Call:
    """One call: a serialized body (any bytes), the method, gRPC metadata."""

    body: bytes
    method: str = "Predict"
    metadata: tuple = ()


@dataclass
class Kind:
    name: str
    build: Callable[[Inputs], Call]
    #: an OK answer must flag every item (the input is absurd or noise); False: the model's verdict is free
    must_flag: bool = True
    #: "main", or "auth": the gateway that requires a token
    gateway: str = "main"
    #: False: gRPC itself refuses the call before the gateway's handler runs (the metrics never count it)
    reaches_handler: bool = True


def _call(request_or_bytes, **kw) -> Call:
    body = request_or_bytes if isinstance(request_or_bytes, bytes) else request_or_bytes.SerializeToString()
    return Call(body, **kw)


def _truncated_png(inp: Inputs) -> bytes:
    from PIL import Image

    blob = pil_bytes(Image.fromarray(inp.rng.integers(0, 256, (64, 64), dtype=np.uint8)), "PNG")
    return blob[: len(blob) // 2]


def _png_text_bomb(kind: bytes) -> bytes:
    """An 8x8 PNG with a zTXt or iCCP chunk (keyword, NUL, method 0, deflated data) inflating to 256 MB."""
    keyword = b"icc" if kind == b"iCCP" else b"Comment"
    payload = keyword + b"\x00\x00" + zeros_deflated(256 * MiB)
    return png_by_hand(8, 8, zlib.compress(bytes(9) * 8), before_idat=png_chunk(kind, payload))


def _png_at_limit(side: int = 4096) -> bytes:
    """A complete black 8-bit RGB PNG of ``side x side`` pixels (the default per-image limit): 50 MB decoded."""
    return png_by_hand(side, side, zeros_deflated(side * (3 * side + 1)), color_type=2)


def _png_chunk_flood(inp: Inputs, count: int = 1_000_000) -> bytes:
    """A 28x28 PNG with ``count`` empty private ancillary chunks before its pixels (12 bytes each): header
    parsing has to walk all of them."""
    chunk = png_chunk(b"prVt", b"")
    return png_by_hand(28, 28, zlib.compress(bytes(29) * 28), before_idat=chunk * count)


def _jpeg_marker_flood(count: int = 2_000_000) -> bytes:
    """A JPEG with ``count`` empty COM segments (4 bytes each) before its SOF: the header parser walks them."""
    from PIL import Image

    data = pil_bytes(Image.new("L", (8, 8), 128), "JPEG")
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


def _png_16bit(inp: Inputs) -> bytes:
    from PIL import Image

    return pil_bytes(Image.fromarray(inp.rng.integers(0, 65536, (28, 28), dtype=np.uint16)), "PNG")


def _png_palette(inp: Inputs) -> bytes:
    return pil_bytes(inp.noise_rgb.convert("P", palette=1, colors=256), "PNG")  # palette=1: ADAPTIVE


def _jpeg_cmyk(inp: Inputs) -> bytes:
    return pil_bytes(inp.noise_rgb.convert("CMYK"), "JPEG")


def _noise_image(inp: Inputs, w: int, h: int, mode: str = "L"):
    from PIL import Image

    channels = {"L": (), "RGB": (3,), "RGBA": (4,), "LA": (2,)}[mode]  # fromarray infers the mode from them
    return Image.fromarray(inp.rng.integers(0, 256, (h, w, *channels), dtype=np.uint8))


def _other_format(fmt: str) -> Callable[[Inputs], Call]:
    def build(inp: Inputs) -> Call:
        image = inp.noise_rgb.convert("P") if fmt == "GIF" else inp.noise_rgb
        return _call(inp.images([pil_bytes(image, fmt)]))
    return build


def _invalid_utf8(number: int) -> Callable[[Inputs], Call]:
    def build(inp: Inputs) -> Call:
        body = inp.good_png().SerializeToString()
        if number == 6:  # a metadata map entry whose key is not UTF-8
            return _call(body + pb_field(6, pb_field(1, b"\xff\xfekey") + pb_field(2, b"value")))
        return _call(body + pb_field(number, b"bad \xff\xfe\xc0\x80 utf-8"))
    return build


def _images(blobs: Callable[[Inputs], list[bytes]], **fields) -> Callable[[Inputs], Call]:
    return lambda inp: _call(inp.images(blobs(inp), **fields))


def _noise_png(**fields) -> Callable[[Inputs], Call]:
    """One noise PNG (which the model flags) in a request with these (hostile) fields."""
    return lambda inp: _call(inp.images([inp.noise_png], **fields))


def _tensor(dtype: str, shape: Callable[[Inputs], list[int]], data: Callable[[Inputs], bytes] = lambda inp: b""):
    return lambda inp: _call(inp.tensor(dtype, shape(inp), data(inp)))


def _floats(values: Callable[[Inputs], np.ndarray]) -> Callable[[Inputs], Call]:
    return lambda inp: _call(inp.floats(values(inp)))


def _one_value_at(inp: Inputs, batch: int, index: int, value: float, rest: float) -> np.ndarray:
    x = np.full(batch * math.prod(inp.shape), rest, np.float32)
    x[index] = value
    return x.reshape(batch, *inp.shape)


def _auth(header: str | None, body: Callable[[Inputs], Call] = lambda inp: _call(inp.good_png())):
    """A call to the token-protected gateway with this ``authorization`` header (None: none)."""
    def build(inp: Inputs) -> Call:
        call = body(inp)
        call.metadata = (("authorization", header),) if header is not None else ()
        return call
    return build


def kinds(max_batch: int) -> list[Kind]:
    """The hostile kinds, in the order they are sent."""
    empty_idat = zlib.compress(b"")
    floats = [
        ("float32 NaN", lambda inp: _call(inp.float_batch(np.nan))),
        ("float32 +Inf", lambda inp: _call(inp.float_batch(np.inf))),
        ("float32 -Inf", lambda inp: _call(inp.float_batch(-np.inf))),
        ("float32 one NaN in item 2",
         _floats(lambda inp: _one_value_at(inp, 2, math.prod(inp.shape) + 7, np.nan, 0.1))),
        ("float32 constant 3e38", lambda inp: _call(inp.float_batch(3e38))),
        ("float32 constant -3e38", lambda inp: _call(inp.float_batch(-3e38))),
        ("float32 float32-max everywhere", lambda inp: _call(inp.float_batch(np.finfo(np.float32).max))),
        ("float32 constant 1e3", lambda inp: _call(inp.float_batch(1e3))),
        ("float32 noise x1e4", _floats(lambda inp: inp.rng.standard_normal((2, *inp.shape)) * 1e4)),
        ("float32 alternating +-3e38", _floats(lambda inp: np.resize(np.float32([3e38, -3e38]), (2, *inp.shape)))),
        ("float32 one pixel 1e30", _floats(lambda inp: _one_value_at(inp, 1, 400, 1e30, 0.0))),
        ("float32 all zeros", lambda inp: _call(inp.float_batch(0.0))),
        ("float32 denormals", lambda inp: _call(inp.float_batch(np.float32(1e-45)))),
    ]
    item_bytes = lambda inp: 4 * math.prod(inp.shape)  # noqa: E731
    return [
        # -- decompression bombs and pixel limits
        Kind("PNG bomb 13000x13000", _images(lambda inp: [inp.png_bomb])),
        Kind("JPEG bomb SOF 65000x65000", _images(lambda inp: [inp.jpeg_bomb])),
        Kind("64 PNG bombs in one request", _images(lambda inp: [inp.png_bomb] * 64)),
        Kind("PNG just above pixel limit 4097x4096", _images(lambda inp: [png_by_hand(4097, 4096, empty_idat)])),
        Kind("PNG header 0x28", _images(lambda inp: [png_by_hand(0, 28, empty_idat)])),
        Kind("PNG header (2^31-1)x1", _images(lambda inp: [png_by_hand(2**31 - 1, 1, empty_idat)])),
        Kind("3 black PNGs of 4096x4096 RGB (at the limits)", _images(lambda inp: [_png_at_limit()] * 3)),
        Kind(f"{max_batch} images of 4096x2048 (request pixels)",
             _images(lambda inp: [png_by_hand(4096, 2048, empty_idat)] * max_batch)),
        # -- formats the API does not take
        Kind("BMP image", _other_format("BMP")),
        Kind("TIFF image", _other_format("TIFF")),
        Kind("GIF image", _other_format("GIF")),
        Kind("WEBP image", _other_format("WEBP")),
        # -- broken or odd PNG / JPEG
        Kind("truncated PNG", _images(lambda inp: [_truncated_png(inp)])),
        Kind("PNG bad IHDR CRC", _images(lambda inp: [png_by_hand(28, 28, zlib.compress(bytes(29) * 28), ihdr_crc=0)])),
        Kind("PNG huge zTXt (256 MB inflated)", _images(lambda inp: [_png_text_bomb(b"zTXt")])),
        Kind("PNG huge iCCP (256 MB inflated)", _images(lambda inp: [_png_text_bomb(b"iCCP")])),
        Kind("PNG 1M empty chunks before IDAT", _images(lambda inp: [_png_chunk_flood(inp)])),
        Kind("JPEG 2M COM markers before SOF", _images(lambda inp: [_jpeg_marker_flood()])),
        Kind("PNG magic then garbage", _images(lambda inp: [PNG_MAGIC + os.urandom(2048)])),
        Kind("empty image bytes", _images(lambda inp: [b""])),
        Kind("garbage image bytes", _images(lambda inp: [os.urandom(4096)])),
        Kind("PNG 1x1", _images(lambda inp: [pil_bytes(_noise_image(inp, 1, 1), "PNG")]), must_flag=False),
        Kind("PNG 1x100000", _images(lambda inp: [pil_bytes(_noise_image(inp, 1, 100000), "PNG")])),
        Kind("PNG 100000x1", _images(lambda inp: [pil_bytes(_noise_image(inp, 100000, 1), "PNG")])),
        Kind("PNG 16-bit grayscale", _images(lambda inp: [_png_16bit(inp)])),
        Kind("PNG palette", _images(lambda inp: [_png_palette(inp)])),
        Kind("PNG RGBA / LA", _images(lambda inp: [pil_bytes(_noise_image(inp, 28, 28, mode), "PNG")
                                                   for mode in ("RGBA", "LA")])),
        Kind("JPEG CMYK", _images(lambda inp: [_jpeg_cmyk(inp)])),
        Kind("no images (batch 0)", _images(lambda inp: [])),
        Kind("9000 empty images (above max_inflight_items)", _images(lambda inp: [b""] * 9000)),
        Kind(f"{max_batch + 1} images (batch above max)", _images(lambda inp: [inp.noise_png] * (max_batch + 1))),
        # -- absurd float32 tensors
        *[Kind(name, build) for name, build in floats],
        # -- dtypes, shapes, lengths, batch sizes
        Kind("float64 dtype", _tensor("float64", lambda inp: [1, *inp.shape], lambda inp: 2 * bytes(item_bytes(inp)))),
        Kind("unknown dtype of 1 MB", _tensor("x" * MiB, lambda inp: [1, *inp.shape])),
        Kind("empty dtype", _tensor("", lambda inp: [1, *inp.shape], lambda inp: bytes(item_bytes(inp)))),
        Kind("wrong shape (H-1)", _floats(lambda inp: np.zeros((1, inp.shape[0], inp.shape[1] - 1, inp.shape[2])))),
        Kind("no shape", _tensor("float32", lambda inp: [], lambda inp: bytes(16))),
        Kind("negative dim", _tensor("float32", lambda inp: [1, inp.shape[0], -inp.shape[1], inp.shape[2]])),
        Kind("negative batch", _tensor("float32", lambda inp: [-1, *inp.shape])),
        Kind("huge dims 2^62, no data", _tensor("float32", lambda inp: [1, 2**62, 2**62, 2**62])),
        Kind("int64-max batch, no data", _tensor("uint8", lambda inp: [2**63 - 1, 28, 28])),
        Kind("byte length mismatch (-1 byte)", _tensor("float32", lambda inp: [1, *inp.shape],
                                                       lambda inp: bytes(item_bytes(inp) - 1))),
        Kind("shape with 10 dims", _tensor("float32", lambda inp: [1] * 10, lambda inp: bytes(4))),
        Kind("float32 batch 0", _tensor("float32", lambda inp: [0, *inp.shape])),
        Kind("float32 batch above max", _floats(lambda inp: np.zeros((max_batch + 1, *inp.shape)))),
        Kind("uint8 1x100000x100000, little data", _tensor("uint8", lambda inp: [1, 100000, 100000],
                                                           lambda inp: bytes(1024))),
        Kind("uint8 [1,28,28,2] (2 channels)", _tensor("uint8", lambda inp: [1, 28, 28, 2],
                                                       lambda inp: bytes(28 * 28 * 2))),
        Kind("uint8 [1,0,28] (empty image)", _tensor("uint8", lambda inp: [1, 0, 28])),
        Kind("no input at all", lambda inp: _call(inp.request())),
        # -- bodies that are not a PredictRequest
        Kind("undecodable protobuf body", lambda inp: _call(b"\xff" * 11 + b"\x01garbage")),
        Kind("truncated protobuf body", lambda inp: _call(inp.good_png().SerializeToString()[:-7])),
        Kind("protobuf groups nested 100000 deep", lambda inp: _call(b"\x7b" * 100_000 + b"\x7c" * 100_000)),
        Kind("wrong wire type for images", lambda inp: _call(varint(2 << 3 | 0) + varint(12345))),
        Kind("invalid UTF-8 in request_id", _invalid_utf8(5)),
        Kind("invalid UTF-8 in model", _invalid_utf8(3)),
        Kind("invalid UTF-8 metadata key", _invalid_utf8(6)),
        Kind("10 MB unknown field + noise PNG",
             lambda inp: _call(inp.good_png().SerializeToString() + pb_field(99, bytes(10 * MiB)))),
        # -- sizes of the request's own fields
        Kind("request_id 257 bytes", _noise_png(request_id="r" * 257)),
        Kind("request_id 16 MB", lambda inp: _noise_png(request_id="r" * 16_000_000)(inp)),
        Kind("metadata value 12 MB", lambda inp: _noise_png(metadata={"k": "v" * 12_000_000})(inp)),
        Kind("10000 metadata keys", lambda inp: _noise_png(metadata={f"key{i}": "v" for i in range(10_000)})(inp)),
        Kind("unknown model, 1 MB name", lambda inp: _noise_png(model="m" * MiB)(inp)),
        Kind("unknown model, short name", _noise_png(model="no-such-model")),
        Kind("negative version", _noise_png(version=-1)),
        Kind("huge version 2^63-1", _noise_png(version=2**63 - 1)),
        Kind("top_k 2^32-1", _noise_png(top_k=2**32 - 1)),
        Kind("message above max size (17 MiB)", _tensor("uint8", lambda inp: [1, 17 * 1024, 1024],
                                                        lambda inp: bytes(17 * MiB)), reaches_handler=False),
        Kind("gRPC header of 64 KB", lambda inp: _call(inp.good_png(), metadata=(("x-junk", "j" * 65536),)),
             reaches_handler=False),
        # -- ModelInfo
        Kind("ModelInfo garbage body", lambda inp: _call(b"\x0a\xff\xff\xff\xff\x0f", method="ModelInfo")),
        Kind("ModelInfo unknown model, 1 MB name", lambda inp: _call(pb_field(1, b"m" * MiB), method="ModelInfo")),
        # -- the vectors of the last attack, one call each (the vectors part sends them alone and 4 at once)
        *[Kind(v.name, v.build) for v in attack_vectors()],
        # -- authentication (the second gateway, started with a token)
        Kind("auth: no token", _auth(None), gateway="auth"),
        Kind("auth: wrong token", _auth("Bearer not-the-token"), gateway="auth"),
        Kind("auth: Basic scheme", _auth("Basic " + AUTH_TOKEN), gateway="auth"),
        Kind("auth: token with 4 KB suffix", _auth(f"Bearer {AUTH_TOKEN}" + "x" * 4096), gateway="auth"),
        Kind("auth: ModelInfo without token", _auth(None, lambda inp: _call(b"", method="ModelInfo")), gateway="auth"),
    ]


# -- the gateway process ----------------------------------------------------------------------------
def start_gateway(name: str, repository: Path, work: Path, extra: list[str], token: str = "") -> GatewayProcess:
    """``oodguard serve`` on free loopback ports (gRPC and metrics) with a SQLite queue; with ``token``, every call
    but health must carry it. Not yet waited for (``wait_ready()``: up to 120 s)."""
    return GatewayProcess(repository, ["--queue-url", f"sqlite:///{work / f'{name}-queue.sqlite'}",
                                       "--drain-timeout-s", "1", "--log-level", "WARNING", *extra],
                          work=work, name=name, metrics=True, auth_token=token or None,
                          env=environment(),  # only the flags above count
                          ready_timeout_s=120, stop_timeout_s=15).start(wait=False)


def health_status(channel, timeout: float = 2.0) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        return f"health call failed: {exc.code().name}"


class Fleet:
    """The gateways of the run by role ("main", "auth"), with a client channel each; a gateway that died is
    restarted (its successor gets a log of its own), and every process ever started is stopped at the end."""

    def __init__(self, repository: Path, work: Path, extra: list[str]):
        self.repository, self.work, self.extra = repository, work, extra
        self.gateways: dict[str, GatewayProcess] = {}
        self.channels: dict = {}
        self.started: list[GatewayProcess] = []
        self.restarts: list[str] = []

    def start(self, role: str, token: str = "") -> GatewayProcess:
        import grpc

        name = role if role not in self.gateways else f"{role}-restart{sum(r == role for r in self.restarts)}"
        gw = start_gateway(name, self.repository, self.work, self.extra, token=token)
        self.started.append(gw)
        gw.wait_ready()
        log(f"gateway {gw.name} SERVING on {gw.target} (pid {gw.pid}, metrics :{gw.metrics_port}"
            f"{', token required' if gw.auth_token else ''})")
        if role in self.channels:
            self.channels[role].close()
        self.gateways[role] = gw
        self.channels[role] = grpc.insecure_channel(gw.target, options=CLIENT_OPTIONS)
        return gw

    def restart(self, role: str) -> GatewayProcess:
        old = self.gateways[role]
        log(f"gateway {old.name} DIED (exit {old.process.returncode}); restarting it")
        self.restarts.append(role)
        return self.start(role, old.auth_token)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        for gw in self.started:
            gw.stop()


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0: ``echo 5 > /proc/PID/clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples a process's VmRSS every ``interval_s`` in a thread; ``peak_kb`` is the largest seen."""

    def __init__(self, pid: int, interval_s: float = 0.005):
        self.pid, self.interval_s = pid, interval_s
        self.peak_kb = proc_status_kb(pid, "VmRSS") or 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proc_status_kb(self.pid, "VmRSS")
            if rss is not None:
                self.peak_kb = max(self.peak_kb, rss)
                self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class MemoryWindow:
    """The gateway's memory over one phase, in MB."""

    rss_before_mb: float
    rss_after_mb: float
    rss_peak_sampled_mb: float
    hwm_before_mb: float
    hwm_after_mb: float
    hwm_reset: bool
    samples: int


class MemoryWatch:
    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self) -> "MemoryWatch":
        self.rss_before = proc_status_kb(self.pid, "VmRSS") or 0
        self.hwm_before = proc_status_kb(self.pid, "VmHWM") or 0
        self.reset = reset_peak_rss(self.pid)
        self.sampler = RssSampler(self.pid).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.sampler.__exit__(*exc)
        mb = lambda kb: round((kb or 0) / 1024, 1)  # noqa: E731
        self.result = MemoryWindow(mb(self.rss_before), mb(proc_status_kb(self.pid, "VmRSS")), mb(self.sampler.peak_kb),
                                   mb(self.hwm_before), mb(proc_status_kb(self.pid, "VmHWM")), self.reset,
                                   self.sampler.samples)


# -- calls ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    code: str
    details: str
    ms: float
    items: int | None = None
    all_ood: bool | None = None
    reasons: list[str] = field(default_factory=list)


def invoke(channel, call: Call, timeout: float = CALL_TIMEOUT_S) -> Outcome:
    """Send ``call.body`` as it is (no client-side serialization) and describe the answer."""
    import grpc

    from oodguard.serve.v1 import oodguard_pb2 as pb

    method = channel.unary_unary(f"/{SERVICE}/{call.method}", request_serializer=None, response_deserializer=None)
    started = time.perf_counter()
    try:
        raw = method(call.body, timeout=timeout, metadata=call.metadata or None)
    except grpc.RpcError as exc:
        ms = (time.perf_counter() - started) * 1e3
        return Outcome(exc.code().name, exc.details() or "", ms)
    ms = (time.perf_counter() - started) * 1e3
    if call.method != "Predict":
        reply = pb.ModelInfoResponse.FromString(raw)
        return Outcome("OK", f"{len(reply.models)} model(s)", ms)
    reply = pb.PredictResponse.FromString(raw)
    flags = [p.decision.ood for p in reply.predictions]
    reasons = sorted({r for p in reply.predictions for r in p.decision.reasons})
    return Outcome("OK", "", ms, len(flags), bool(flags) and all(flags), reasons)


class Tally:
    """Predict calls sent to one gateway, by the code they got (what the metrics must count)."""

    def __init__(self):
        self.codes: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, code: str, n: int = 1) -> None:
        with self._lock:
            self.codes[code] = self.codes.get(code, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.codes)


@dataclass
class GoodStats:
    sent: int = 0
    errors: int = 0
    deadline_misses: int = 0
    overloaded_retries: int = 0
    max_ms: float = 0.0
    error_details: list[str] = field(default_factory=list)


def good_request(channel, inp: Inputs, i: int, stats: GoodStats, tally: Tally | None, token: str = "",
                 retry_overloaded: bool = False, lock: threading.Lock | None = None) -> None:
    """One good request (PNG for even ``i``, uint8 tensor for odd) within a 10 s deadline; with
    ``retry_overloaded``, "overloaded" RESOURCE_EXHAUSTED answers are retried with backoff inside it."""
    request = inp.good_png() if i % 2 == 0 else inp.good_uint8()
    call = _call(request, metadata=(("authorization", f"Bearer {token}"),) if token else ())
    started = time.perf_counter()
    backoff = 0.02
    retries = 0
    while True:
        left = GOOD_DEADLINE_S - (time.perf_counter() - started)
        outcome = invoke(channel, call, timeout=max(left, 0.001)) if left > 0 else Outcome("DEADLINE_EXCEEDED", "", 0)
        if tally is not None and left > 0:
            tally.add(outcome.code)
        overloaded = outcome.code == "RESOURCE_EXHAUSTED" and outcome.details.startswith("overloaded")
        if retry_overloaded and overloaded and GOOD_DEADLINE_S - (time.perf_counter() - started) > backoff:
            retries += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.5)
            continue
        break
    ms = (time.perf_counter() - started) * 1e3
    with lock or threading.Lock():
        stats.sent += 1
        stats.overloaded_retries += retries
        stats.max_ms = max(stats.max_ms, round(ms, 1))
        if outcome.code == "DEADLINE_EXCEEDED" or ms > GOOD_DEADLINE_S * 1e3:
            stats.deadline_misses += 1
        if outcome.code != "OK" or outcome.items != 1:
            stats.errors += 1
            if len(stats.error_details) < 5:
                stats.error_details.append(f"{outcome.code}: {outcome.details[:200]}")


class StallProbe:
    """While a hostile call runs, a thread calls gRPC health on a connection of its own every 10 ms: the
    slowest answer says how long the gateway's event loop (which also serves health) was blocked."""

    def __init__(self, target: str):
        import grpc

        self.target = target
        self.channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.max_ms = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            health_status(self.channel, timeout=30.0)
            self.max_ms = max(self.max_ms, (time.perf_counter() - started) * 1e3)
            self._stop.wait(0.01)

    def start(self) -> None:
        health_status(self.channel)  # connected before the measured call
        self.max_ms = 0.0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return round(self.max_ms, 1)

    def close(self) -> None:
        self.channel.close()


# -- the vectors of the last attack: each alone and 4 at once, memory and good traffic watched -------------
#: per vector and mode: the most the gateway's RSS may grow, the longest the hostile call may take, the slowest
#: a concurrent good request may be
VECTOR_RSS_GROWTH_MB = 512
VECTOR_CALL_S = 15.0
VECTOR_GOOD_WORST_S = 1.0
VECTOR_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")


@dataclass
class Vector:
    name: str
    build: Callable[[Inputs], Call]


def _text_flood_png() -> bytes:
    """A 28x28 grey PNG with 63 zTXt chunks, each 1 MiB of text deflated to ~1 KB under its own key."""
    text = zlib.compress(b"a" * 1_048_560, 9)
    chunks = b"".join(png_chunk(b"zTXt", f"k{i}".encode() + b"\x00\x00" + text) for i in range(63))
    return png_by_hand(28, 28, zlib.compress(bytes(29) * 28), before_idat=chunks)


def _with_model(inp: Inputs, body: bytes) -> Call:
    return Call(pb_field(3, inp.model.encode()) + body)


def attack_vectors() -> list[Vector]:
    """The vectors of issue 29's attack, as it described them."""
    return [
        Vector("16 PNGs of 63 x 1 MiB zTXt (1 MB)", lambda inp: _call(inp.images([_text_flood_png()] * 16))),
        Vector("64 PNGs of 63 x 1 MiB zTXt (4 MB)", lambda inp: _call(inp.images([_text_flood_png()] * 64))),
        Vector("packed shape of 15 M entries (15 MB)",
               lambda inp: _with_model(inp, pb_field(1, pb_field(1, b"float32") + pb_field(2, b"\x01" * 15_000_000)))),
        Vector("1.4 M distinct metadata keys (16 MB)",
               lambda inp: _with_model(inp, b"".join(pb_field(6, pb_field(1, b"%d" % i)) for i in range(1_400_000)))),
        Vector("8 M empty images entries (16 MB)", lambda inp: _with_model(inp, pb_field(2, b"\x0a\x00" * 8_000_000))),
        Vector("PNG 1 x 16,000,000 (thin strip)",
               lambda inp: _call(inp.images([png_by_hand(16_000_000, 1, zeros_deflated(16_000_001))]))),
        Vector("uint8 tensor [1,1,16000000]", lambda inp: _call(inp.tensor("uint8", [1, 1, 16_000_000],
                                                                            bytes(16_000_000)))),
        Vector("PNG of 500,000 empty ancillary chunks (6 MB)",
               lambda inp: _call(inp.images([_png_chunk_flood(inp, 500_000)]))),
    ]


#: the good-traffic client: a process of its own, so that the hostile senders' work in this process (building
#: and sending 16 MB bodies) never shows up as gateway latency. argv: target, body files, result file
GOOD_CLIENT = """
import json, signal, sys, time
import grpc
target, png, uint8, out = sys.argv[1:5]
bodies = [open(png, "rb").read(), open(uint8, "rb").read()]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
call = channel.unary_unary("/oodguard.v1.OODGuard/Predict")
ms, codes, errors = [], [], []
i = 0
while not stop:
    started = time.perf_counter()
    try:
        call(bodies[i % 2], timeout=DEADLINE)
        codes.append("OK")
    except grpc.RpcError as exc:
        codes.append(exc.code().name)
        errors.append(f"{exc.code().name}: {(exc.details() or '')[:120]}")
    ms.append((time.perf_counter() - started) * 1e3)
    if i == 0:
        print("ready", flush=True)
    i += 1
    time.sleep(0.005)
json.dump({"ms": ms, "codes": codes, "errors": errors}, open(out, "w"))
""".replace("DEADLINE", repr(GOOD_DEADLINE_S))


class GoodTraffic:
    """Good requests one after the other (PNG and uint8 alternately) from a client process of its own, each
    latency kept, from entering the context until leaving it."""

    def __init__(self, gw: GatewayProcess, inp: Inputs, tally: Tally, work: Path):
        self.gw, self.tally, self.work = gw, tally, work
        self.bodies = []
        for name, request in (("good-png.bin", inp.good_png()), ("good-uint8.bin", inp.good_uint8())):
            path = work / name
            path.write_bytes(request.SerializeToString())
            self.bodies.append(str(path))
        self.ms: list[float] = []
        self.errors: list[str] = []
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "GoodTraffic":
        self._out = self.work / "good-traffic.json"
        self._out.unlink(missing_ok=True)
        self._process = subprocess.Popen([sys.executable, "-c", GOOD_CLIENT, self.gw.target, *self.bodies,
                                          str(self._out)], stdout=subprocess.PIPE, text=True)
        if self._process.stdout.readline().strip() != "ready":  # its first call answered: traffic is flowing
            raise RuntimeError(f"the good-traffic client exited with {self._process.wait()} before its first call")
        return self

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(GOOD_DEADLINE_S + 10)
        result = json.loads(self._out.read_text())
        self.ms, self.errors = result["ms"], result["errors"]
        for code in result["codes"]:
            self.tally.add(code)

    def summary(self) -> dict:
        ms = np.asarray(self.ms or [0.0])
        return {"sent": len(self.ms), "errors": len(self.errors), "error_details": self.errors[:3],
                "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
                "worst_ms": round(float(ms.max()), 1)}

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()


def quiet_latency(good: GoodTraffic, seconds: float) -> dict:
    with good:
        time.sleep(seconds)
    return good.summary()


def vector_phase(gw: GatewayProcess, inp: Inputs, vector: Vector, senders: int, rounds: int,
                 good: GoodTraffic, tally: Tally) -> dict:
    """``senders`` threads each send the vector ``rounds`` times while good traffic runs; the gateway's memory
    is sampled throughout."""
    import grpc

    call = vector.build(inp)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    with grpc.insecure_channel(gw.target, options=CLIENT_OPTIONS) as channel:
        health_status(channel)

        def sender() -> None:
            for _ in range(rounds):
                outcome = invoke(channel, call)
                tally.add(outcome.code)
                with lock:
                    outcomes.append(outcome)

        with MemoryWatch(gw.pid) as watch, good:
            time.sleep(0.2)  # good traffic is flowing before the first hostile byte
            with ThreadPoolExecutor(senders) as pool:
                for f in [pool.submit(sender) for _ in range(senders)]:
                    f.result()
            time.sleep(0.2)
    m = watch.result
    codes: dict[str, int] = {}
    for o in outcomes:
        codes[o.code] = codes.get(o.code, 0) + 1
    result = {"vector": vector.name, "senders": senders, "rounds": rounds, "body_mb": round(len(call.body) / MiB, 2),
              "codes": dict(sorted(codes.items())), "details": outcomes[0].details[:160],
              "call_max_s": round(max(o.ms for o in outcomes) / 1e3, 2),
              "rss_growth_mb": round(m.rss_peak_sampled_mb - m.rss_before_mb, 1), "memory": asdict(m),
              "good": good.summary(), "alive_after": gw.alive()}
    g = result["good"]
    log(f"vector {vector.name!r} x{senders}: codes {result['codes']} ({result['details'][:70]!r}), slowest "
        f"{result['call_max_s']} s, RSS +{result['rss_growth_mb']:.0f} MB, good {g['sent']} calls, worst "
        f"{g['worst_ms']:.0f} ms, {g['errors']} errors")
    return result


def vectors_part(gw: GatewayProcess, inp: Inputs, rounds: int, quiet_s: float, tally: Tally, work: Path) -> dict:
    good = GoodTraffic(gw, inp, tally, work)
    try:
        quiet = quiet_latency(good, quiet_s)
        log(f"good traffic alone: {quiet['sent']} calls, p99 {quiet['p99_ms']} ms, worst {quiet['worst_ms']} ms")
        runs = []
        for vector in attack_vectors():
            for senders in (1, 4):
                runs.append(vector_phase(gw, inp, vector, senders, rounds, good, tally))
    finally:
        good.close()
    return {"quiet": quiet, "runs": runs}


def vector_checks(part: dict) -> dict[str, bool]:
    runs = part["runs"]
    return {
        f"attack vectors: gateway RSS growth < {VECTOR_RSS_GROWTH_MB} MB, alone and 4 at once":
            all(r["rss_growth_mb"] < VECTOR_RSS_GROWTH_MB for r in runs),
        f"attack vectors: every call answered within {VECTOR_CALL_S:.0f} s with {' / '.join(VECTOR_CODES)}":
            all(r["call_max_s"] < VECTOR_CALL_S and set(r["codes"]) <= set(VECTOR_CODES) for r in runs),
        f"attack vectors: concurrent good traffic never slower than {VECTOR_GOOD_WORST_S:.0f} s, no error":
            all(r["good"]["worst_ms"] < VECTOR_GOOD_WORST_S * 1e3 and not r["good"]["errors"] for r in runs),
        "attack vectors: gateway alive after each": all(r["alive_after"] for r in runs),
    }


def vectors_table(part: dict) -> str:
    quiet = part["quiet"]
    lines = [f"Good traffic alone: p99 {quiet['p99_ms']} ms, worst {quiet['worst_ms']} ms over {quiet['sent']} calls.", "",
             "| vector | senders | body MB | codes | slowest call s | RSS growth MB | good calls | good worst ms | "
             "worst / quiet p99 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in part["runs"]:
        g = r["good"]
        ratio = g["worst_ms"] / max(quiet["p99_ms"], 0.1)
        lines.append(f"| {r['vector']} | {r['senders']} | {r['body_mb']} | {r['codes']} | {r['call_max_s']} | "
                     f"{r['rss_growth_mb']:.0f} | {g['sent']} | {g['worst_ms']:.0f} | {ratio:.1f}x |")
    return "\n".join(lines)


# -- Redis paused under flagged traffic ---------------------------------------------------------------
REDIS_PAUSE_P99_S = 1.0


def start_redis(binary: str, folder: Path) -> tuple[subprocess.Popen, int]:
    """A redis-server with every write on disk before it answers (as the queue's durability expects)."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
                                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not answer PING within 20 s")


def stored_ids(port: int) -> dict[str, int]:
    import redis

    client = redis.Redis(port=port)
    try:
        counts: dict[str, int] = {}
        for _, fields in client.xrange("oodguard:queue:stream"):
            rid = fields[b"id"].decode()
            counts[rid] = counts.get(rid, 0) + 1
        return counts
    finally:
        client.close()


def redis_pause_part(repository: Path, work: Path, extra: list[str], inp: Inputs, pause_s: float,
                     clients: int = 2) -> dict:
    """Flagged traffic (noise PNGs: every item is queued) from ``clients`` threads: 2 s with Redis up, ``pause_s``
    with it SIGSTOPped (it accepts connections and answers nothing), 3 s after SIGCONT. Then every acknowledged
    record id must reach Redis exactly once (the spool replays what was written meanwhile)."""
    import shutil

    import grpc

    from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

    binary = shutil.which("redis-server")
    if binary is None:
        log("redis pause: redis-server is not installed (bash scripts/setup_redis.sh): skipped")
        return {"skipped": "redis-server is not installed"}
    redis_process, port = start_redis(binary, work / "redis-data")
    gw = None
    try:
        gw = start_gateway("redis", repository, work, [*extra, "--queue-url", f"redis://127.0.0.1:{port}/0",
                                                        "--queue-spool-path", str(work / "redis.spool")])
        gw.wait_ready()
        calls: list[tuple[float, float, str, list[str]]] = []  # (start since t0, seconds, code, record ids)
        lock = threading.Lock()
        stop = threading.Event()
        t0 = time.perf_counter()
        request = inp.images([inp.noise_png])

        def client() -> None:
            with grpc.insecure_channel(gw.target) as channel:
                stub = pb_grpc.OODGuardStub(channel)
                while not stop.is_set():
                    started = time.perf_counter()
                    try:
                        reply = stub.Predict(request, timeout=30)
                        code, ids = "OK", [p.queue_record_id for p in reply.predictions if p.queue_record_id]
                    except grpc.RpcError as exc:
                        code, ids = exc.code().name, []
                    with lock:
                        calls.append((started - t0, time.perf_counter() - started, code, ids))

        log(f"redis pause: flagged traffic from {clients} clients; Redis paused {pause_s:g} s after 2 s")
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client) for _ in range(clients)]
            time.sleep(2.0)
            paused_at = time.perf_counter() - t0
            os.kill(redis_process.pid, signal.SIGSTOP)
            time.sleep(pause_s)
            os.kill(redis_process.pid, signal.SIGCONT)
            resumed_at = time.perf_counter() - t0
            time.sleep(3.0)
            stop.set()
            for f in futures:
                f.result()
        acknowledged = [rid for _, _, code, ids in calls if code == "OK" for rid in ids]
        deadline = time.monotonic() + 60
        while True:  # the spool's replay lands what was written while Redis was paused
            stored = stored_ids(port)
            if set(acknowledged) <= set(stored) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        during = [s for start, s, _, _ in calls if paused_at <= start < resumed_at]
        codes: dict[str, int] = {}
        for _, _, code, _ in calls:
            codes[code] = codes.get(code, 0) + 1
        result = {"pause_s": pause_s, "clients": clients, "calls": len(calls), "codes": dict(sorted(codes.items())),
                  "calls_during_pause": len(during),
                  "p99_during_pause_s": round(float(np.percentile(during, 99)), 3) if during else None,
                  "worst_during_pause_s": round(max(during), 3) if during else None,
                  "acknowledged_ids": len(acknowledged), "lost": len(set(acknowledged) - set(stored)),
                  "duplicated": sum(1 for rid in acknowledged if stored.get(rid, 0) > 1)}
        log(f"redis pause: {result['calls_during_pause']} calls during the pause, p99 {result['p99_during_pause_s']} s; "
            f"{result['acknowledged_ids']} acknowledged ids, {result['lost']} lost, {result['duplicated']} duplicated")
        return result
    finally:
        if gw is not None:
            gw.stop()
        if redis_process.poll() is None:
            os.kill(redis_process.pid, signal.SIGCONT)
        redis_process.terminate()
        redis_process.wait(10)


def redis_text(part: dict) -> str:
    if "skipped" in part:
        return f"skipped: {part['skipped']}"
    return (f"Redis paused {part['pause_s']:g} s under flagged traffic from {part['clients']} clients: {part['calls']} "
            f"calls, codes {part['codes']}; {part['calls_during_pause']} began during the pause, p99 "
            f"{part['p99_during_pause_s']} s, worst {part['worst_during_pause_s']} s; {part['acknowledged_ids']} "
            f"acknowledged record ids, {part['lost']} lost, {part['duplicated']} stored twice.")


def redis_checks(part: dict) -> dict[str, bool]:
    if "skipped" in part:
        return {}
    return {f"redis paused {part['pause_s']:g} s: flagged p99 < {REDIS_PAUSE_P99_S:g} s":
                part["p99_during_pause_s"] is not None and part["p99_during_pause_s"] < REDIS_PAUSE_P99_S,
            "redis paused: every acknowledged record stored exactly once, every call OK":
                part["lost"] == 0 and part["duplicated"] == 0 and set(part["codes"]) == {"OK"}}


# -- metrics ----------------------------------------------------------------------------------------
def scrape_requests_by_code(gw: GatewayProcess) -> dict[str, float]:
    """``oodguard_requests_total`` of the gateway, summed over model and version, by code."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "oodguard_requests_total":
                code = sample.labels.get("code", "")
                totals[code] = totals.get(code, 0.0) + sample.value
    return totals


def counts_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    delta = {code: int(round(after.get(code, 0) - before.get(code, 0))) for code in set(after) | set(before)}
    return {code: n for code, n in sorted(delta.items()) if n}


# -- the three parts --------------------------------------------------------------------------------
@dataclass
class KindResult:
    kind: str
    code: str
    details: str
    ms: float
    details_len: int
    items: int | None
    all_ood: bool | None
    reasons: list[str]
    must_flag: bool
    gateway: str
    health_after: str
    good_after: str
    alive_after: bool
    #: the slowest concurrent health check while the call ran (the gateway's event loop blocked that long)
    stall_ms: float = 0.0
    reaches_handler: bool = True

    @property
    def healthy_after(self) -> bool:
        return self.alive_after and self.health_after == "SERVING" and self.good_after == "OK"

    @property
    def allowed(self) -> bool:
        if self.code == "OK":
            return self.all_ood is None or bool(self.all_ood) or not self.must_flag
        return self.code in ALLOWED_CODES

    def summary(self) -> str:
        if self.code == "OK" and self.items is not None:
            verdict = "all ood" if self.all_ood else "NOT all ood"
            reasons = f" ({', '.join(self.reasons)})" if self.reasons else ""
            return f"{self.items} item(s), {verdict}{reasons}"
        return self.details


def run_kinds(fleet: Fleet, inp: Inputs, max_batch: int, tallies: dict[str, Tally]) -> list[KindResult]:
    results = []
    todo = [k for k in kinds(max_batch) if k.gateway in fleet.gateways]
    probes: dict[str, StallProbe] = {}
    try:
        for n, kind in enumerate(todo, 1):
            gw = fleet.gateways[kind.gateway]
            if kind.gateway not in probes or probes[kind.gateway].target != gw.target:
                probes[kind.gateway] = StallProbe(gw.target)
            result = run_kind(n, len(todo), kind, gw, fleet.channels[kind.gateway], probes[kind.gateway], inp,
                              tallies[kind.gateway])
            results.append(result)
            if not result.alive_after:
                fleet.restart(kind.gateway)
    finally:
        for probe in probes.values():
            probe.close()
    return results


def run_kind(n: int, count: int, kind: Kind, gw: GatewayProcess, channel, probe: StallProbe, inp: Inputs,
             tally: Tally) -> KindResult:
    call = kind.build(inp)
    probe.start()
    try:
        outcome = invoke(channel, call)
    finally:
        stall_ms = probe.stop()
    if call.method == "Predict" and kind.reaches_handler:
        tally.add(outcome.code)
    health = health_status(channel)
    stats = GoodStats()
    good_request(channel, inp, 0, stats, tally, token=gw.auth_token)
    good = "OK" if not stats.errors else stats.error_details[0][:120]
    alive = gw.alive()
    result = KindResult(kind.name, outcome.code, outcome.details[:2000], round(outcome.ms, 1),
                        len(outcome.details), outcome.items, outcome.all_ood, outcome.reasons, kind.must_flag,
                        kind.gateway, health, good, alive, stall_ms, kind.reaches_handler)
    mark = "" if result.allowed and result.healthy_after else "   <-- CHECK"
    log(f"kind {n:2d}/{count} {kind.name}: {outcome.code} {result.summary()[:90]!r} "
        f"{outcome.ms:.0f} ms (health waited up to {stall_ms:.0f} ms), health after {health}, good {good}{mark}")
    if not alive:
        log(f"gateway {gw.name} died after kind {kind.name!r}; its log ends:\n"
            f"{gw.log_path.read_text(errors='replace')[-3000:]}")
    return result


def bomb_phase(name: str, gw: GatewayProcess, inp: Inputs, senders: int, bombs_per_request: int, rounds: int,
               good_count: int, tally: Tally) -> dict:
    """``senders`` threads each send requests of ``bombs_per_request`` bombs (PNG and JPEG alternately), one after
    the other, at least ``rounds`` each and for as long as the good traffic runs: ``good_count`` good requests,
    25 ms apart, on a connection of their own."""
    import grpc

    log(f"bomb memory: {name}")
    codes: dict[str, int] = {}
    lock = threading.Lock()
    stats = GoodStats()
    sent = [0]
    with ExitStack() as stack:
        bomb_channel = stack.enter_context(grpc.insecure_channel(gw.target, options=CLIENT_OPTIONS))
        good_channel = stack.enter_context(grpc.insecure_channel(gw.target, options=CLIENT_OPTIONS +
                                                                 [("grpc.use_local_subchannel_pool", 1)]))
        health_status(good_channel)  # connected before the phase
        requests = [inp.images([inp.png_bomb if (j + k) % 2 == 0 else inp.jpeg_bomb for j in range(bombs_per_request)])
                    .SerializeToString() for k in range(2)]
        good_done = threading.Event()

        def sender(s: int) -> None:
            r = 0
            while r < rounds or not good_done.is_set():
                outcome = invoke(bomb_channel, Call(requests[(s + r) % 2]))
                tally.add(outcome.code)
                with lock:
                    codes[outcome.code] = codes.get(outcome.code, 0) + 1
                    sent[0] += 1
                r += 1

        def good_sender() -> None:
            try:
                for i in range(good_count):
                    good_request(good_channel, inp, i, stats, tally, lock=lock)
                    time.sleep(0.025)
            finally:
                good_done.set()

        with MemoryWatch(gw.pid) as watch:
            started = time.perf_counter()
            with ThreadPoolExecutor(senders + 1) as pool:
                futures = [pool.submit(sender, s) for s in range(senders)]
                good_future = pool.submit(good_sender)
                good_future.result()
                for f in futures:
                    f.result()
            seconds = time.perf_counter() - started
    return {"phase": name, "senders": senders, "bombs_per_request": bombs_per_request, "min_rounds": rounds,
            "request_bytes": max(map(len, requests)), "bomb_requests": sent[0],
            "bomb_codes": dict(sorted(codes.items())), "seconds": round(seconds, 2), "memory": asdict(watch.result),
            "good": asdict(stats), "health_after": health_after(gw)}


def health_after(gw: GatewayProcess) -> str:
    import grpc

    with grpc.insecure_channel(gw.target) as channel:
        return health_status(channel)


async def _burst_calls(target: str, body: bytes, n: int) -> tuple[list[tuple[str, str, float]], float]:
    """``n`` concurrent calls of ``body`` on one grpc.aio channel: (code, details, seconds since the start)."""
    import grpc

    async with grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
        await channel.channel_ready()
        method = channel.unary_unary(f"/{SERVICE}/Predict", request_serializer=None, response_deserializer=None)
        started = time.perf_counter()

        async def one() -> tuple[str, str, float]:
            try:
                await method(body, timeout=CALL_TIMEOUT_S)
                code, details = "OK", ""
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            return code, details, time.perf_counter() - started

        results = await asyncio.gather(*(one() for _ in range(n)))
        return results, time.perf_counter() - started


def burst_phase(gw: GatewayProcess, inp: Inputs, n: int, items: int, tally: Tally) -> dict:
    import grpc

    log(f"burst: {n} concurrent requests of {items} noise PNGs")
    blobs = [inp.noise_pngs[i % len(inp.noise_pngs)] for i in range(items)]
    body = inp.images(blobs).SerializeToString()
    before = scrape_requests_by_code(gw)
    good_tally = Tally()
    stats = GoodStats()
    done = threading.Event()

    def good_traffic() -> None:
        with grpc.insecure_channel(gw.target, options=CLIENT_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]) as ch:
            i = 0
            while not done.is_set() or i < 5:
                good_request(ch, inp, i, stats, good_tally, retry_overloaded=True)
                i += 1
                time.sleep(0.05)

    with MemoryWatch(gw.pid) as watch:
        good_thread = threading.Thread(target=good_traffic, name="good-traffic")
        good_thread.start()
        try:
            results, seconds = asyncio.run(_burst_calls(gw.target, body, n))
        finally:
            done.set()
            good_thread.join()
    codes: dict[str, int] = {}
    for code, _, _ in results:
        codes[code] = codes.get(code, 0) + 1
    for code, count in codes.items():
        tally.add(code, count)
    for code, count in good_tally.snapshot().items():
        tally.add(code, count)
    refused = [t for code, _, t in results if code == "RESOURCE_EXHAUSTED"]
    ok_times = [t for code, _, t in results if code == "OK"]
    other = sorted({f"{code}: {details[:120]}" for code, details, _ in results
                    if code not in ("OK", "RESOURCE_EXHAUSTED")})
    refusal_reasons: dict[str, int] = {}
    for code, details, _ in results:
        if code == "RESOURCE_EXHAUSTED":
            key = details.split("(")[0].strip()[:80]
            refusal_reasons[key] = refusal_reasons.get(key, 0) + 1
    after = scrape_requests_by_code(gw)
    client = dict(codes)
    for code, count in good_tally.snapshot().items():
        client[code] = client.get(code, 0) + count
    metrics = counts_delta(after, before)
    return {
        "requests": n, "items_per_request": items, "request_bytes": len(body),
        "codes": dict(sorted(codes.items())), "ok": codes.get("OK", 0), "resource_exhausted": len(refused),
        "other": sum(c for k, c in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")), "other_details": other[:10],
        "refusal_reasons": dict(sorted(refusal_reasons.items())),
        "seconds_all_answered": round(seconds, 3),
        "seconds_all_refused_answered": round(max(refused), 3) if refused else None,
        "seconds_first_refused": round(min(refused), 3) if refused else None,
        "seconds_refused_p50": round(float(np.percentile(refused, 50)), 3) if refused else None,
        "seconds_last_ok": round(max(ok_times), 3) if ok_times else None,
        "memory": asdict(watch.result), "good": asdict(stats),
        "metrics_check": {"client_by_code": dict(sorted(client.items())), "metrics_delta_by_code": metrics,
                          "equal": metrics == {k: v for k, v in sorted(client.items()) if v}},
        "health_after": health_after(gw),
    }


# -- the report -------------------------------------------------------------------------------------
def _cell(text: str, limit: int = DETAILS_CUT) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kinds_table(results: list[KindResult]) -> str:
    lines = ["| kind | code | details | ms | healthy after |", "|---|---|---|---:|---|"]
    for r in results:
        healthy = "yes" if r.healthy_after else (
            f"NO (health {r.health_after}, good request {r.good_after}, process {'up' if r.alive_after else 'DEAD'})")
        code = r.code if r.allowed else f"**{r.code}**"
        lines.append(f"| {_cell(r.kind, 60)} | {code} | {_cell(r.summary())} | {r.ms:.1f} | {_cell(healthy)} |")
    return "\n".join(lines)


def summary_text(report: dict) -> str:
    meta = report["meta"]
    out = [f"- gateway (main) RSS at start {meta['main_rss_mb_at_start']:.0f} MB (VmHWM "
           f"{meta['main_vmhwm_mb_at_start']:.0f} MB); after the kinds RSS {meta['main_rss_mb_after_kinds']:.0f} MB, "
           f"VmHWM {meta['main_vmhwm_mb_after_kinds']:.0f} MB (the peak over every kind, 16 MB bodies and 3 images at "
           "the pixel limits included)"]
    for phase in report["bomb_memory"]:
        m, g = phase["memory"], phase["good"]
        hwm = (f"VmHWM over the phase {m['hwm_after_mb']:.0f} MB (reset at its start)" if m["hwm_reset"] else
               f"VmHWM {m['hwm_before_mb']:.0f} -> {m['hwm_after_mb']:.0f} MB (process peak, no reset)")
        out.append(f"- bomb memory, {phase['phase']}: {phase['bomb_requests']} bomb requests "
                   f"({phase['bombs_per_request']} bomb(s), {phase['request_bytes'] / MiB:.2f} MB each; "
                   f"{phase['senders']} at once) in {phase['seconds']:.1f} s, codes {phase['bomb_codes']}; "
                   f"gateway RSS {m['rss_before_mb']:.0f} -> peak {m['rss_peak_sampled_mb']:.0f} MB sampled "
                   f"({m['samples']} samples), {hwm}; "
                   f"good requests {g['sent']}: {g['errors']} errors, {g['deadline_misses']} deadline misses (10 s), "
                   f"slowest {g['max_ms']:.0f} ms")
    b = report.get("burst")
    if b:
        m, g, mc = b["memory"], b["good"], b["metrics_check"]
        other = f" {b['other_details']}" if b["other"] else ""
        out.append(f"- burst: {b['requests']} concurrent requests x {b['items_per_request']} noise PNGs "
                   f"({b['request_bytes'] / 1024:.0f} KB each): OK {b['ok']}, RESOURCE_EXHAUSTED "
                   f"{b['resource_exhausted']}, other {b['other']}{other}; refusals by reason {b['refusal_reasons']}")
        out.append(f"- burst timing: every refused call answered after {b['seconds_all_refused_answered']} s "
                   f"(first after {b['seconds_first_refused']} s, median {b['seconds_refused_p50']} s), last OK after "
                   f"{b['seconds_last_ok']} s, all answered after {b['seconds_all_answered']} s; gateway RSS "
                   f"{m['rss_before_mb']:.0f} -> peak {m['rss_peak_sampled_mb']:.0f} MB sampled, VmHWM "
                   f"{m['hwm_after_mb']:.0f} MB{' (reset at the start of the burst)' if m['hwm_reset'] else ''}")
        out.append(f"- burst good traffic (other channel, retrying 'overloaded' with backoff within 10 s): "
                   f"{g['sent']} requests, {g['errors']} errors, {g['deadline_misses']} deadline misses, "
                   f"{g['overloaded_retries']} overloaded retries, slowest {g['max_ms']:.0f} ms")
        out.append(f"- metrics over the burst window: oodguard_requests_total by code {mc['metrics_delta_by_code']} vs "
                   f"client {mc['client_by_code']}: {'equal' if mc['equal'] else 'DIFFERENT'}")
    whole = report.get("whole_run_metrics")
    if whole:
        out.append(f"- metrics over the whole run (main gateway; calls gRPC refuses before the handler left out): "
                   f"{whole['metrics_by_code']} vs client {whole['client_by_code']}: "
                   f"{'equal' if whole['equal'] else 'different'}")
    for name, info in report.get("gateway_log", {}).items():
        out.append(f"- gateway {name} log: {info['lines']} lines, {info['tracebacks']} tracebacks, "
                   f"{info['errors']} ERROR lines, {info['warnings']} WARNING lines")
    return "\n".join(out)


def checks(report: dict) -> dict[str, bool]:
    kinds_ = report["kinds"]
    c = {
        "at least 40 kinds": len(kinds_) >= 40,
        "every code allowed (OK only with every item flagged where the input is absurd)":
            all(k["allowed"] for k in kinds_),
        "healthy after every kind": all(k["healthy_after"] for k in kinds_),
        "no good-traffic error during the bombs": all(p["good"]["errors"] == 0 and p["good"]["deadline_misses"] == 0
                                                       for p in report["bomb_memory"]),
        "gateway SERVING after the bombs": all(p["health_after"] == "SERVING" for p in report["bomb_memory"]),
    }
    c.update(vector_checks(report["attack_vectors"]))
    c.update(redis_checks(report["redis_pause"]))
    b = report.get("burst")
    if b:
        c["no good-traffic error during the burst"] = b["good"]["errors"] == 0 and b["good"]["deadline_misses"] == 0
        c["burst answered only OK / RESOURCE_EXHAUSTED"] = b["other"] == 0
        c["metrics equal the client's counts over the burst"] = b["metrics_check"]["equal"]
        c["gateway SERVING after the burst"] = b["health_after"] == "SERVING"
    return c


#: a concurrent health check slower than this during a kind: the call blocked the gateway's event loop
STALL_FINDING_MS = 250.0
#: error details longer than this echo too much of the client's input
DETAILS_FINDING_CHARS = 1024
#: bomb phases: RSS growth above this many times the request bytes in flight is reported
RSS_FINDING_FACTOR = 4.0


def findings(report: dict) -> list[str]:
    """What a gateway owner should look at, derived from the report by fixed rules (not all are check failures)."""
    out = []
    for k in report["kinds"]:
        name, code, details = k["kind"], k["code"], " ".join(k["details"].split())
        if not k["allowed"]:
            what = "an answer with items not all flagged" if code == "OK" else f"code {code}"
            out.append(f"{name}: {what} ({details[:160]!r})")
        if not k["healthy_after"]:
            out.append(f"{name}: not healthy afterwards (health {k['health_after']}, good request {k['good_after']}, "
                       f"process {'up' if k['alive_after'] else 'DEAD'})")
        if k["reaches_handler"] and "metadata size exceeds" in details:
            out.append(f"{name}: the gateway's error message is above gRPC's metadata limit, so the client never sees "
                       f"it and gets {code} {details[:110]!r} instead (an echoed client string is not truncated?)")
        elif k["details_len"] > DETAILS_FINDING_CHARS:
            out.append(f"{name}: error details of {k['details_len']} characters (echoes the client's input)")
        if code == "RESOURCE_EXHAUSTED" and details.startswith("overloaded"):
            out.append(f"{name}: answered 'overloaded ... retry with backoff' although nothing else was in flight: "
                       f"the request can never be admitted, so a retrying client retries forever ({details[:110]!r})")
        if k["stall_ms"] > STALL_FINDING_MS:
            out.append(f"{name}: a concurrent health check waited {k['stall_ms']:.0f} ms while it ran "
                       f"({k['ms']:.0f} ms, {code}): the gateway's event loop was blocked, every other call waited")
    for phase in report["bomb_memory"]:
        if phase["good"]["errors"] or phase["good"]["deadline_misses"]:
            out.append(f"bomb memory ({phase['phase']}): good requests failed: {phase['good']['error_details']}")
    b = report.get("burst")
    if b:
        if b["other"]:
            out.append(f"burst: {b['other']} calls answered neither OK nor RESOURCE_EXHAUSTED: {b['other_details']}")
        if b["good"]["errors"] or b["good"]["deadline_misses"]:
            out.append(f"burst: good requests failed: {b['good']['error_details']}")
        if not b["metrics_check"]["equal"]:
            mc = b["metrics_check"]
            out.append(f"burst: metrics {mc['metrics_delta_by_code']} differ from the client's {mc['client_by_code']}")
    whole = report.get("whole_run_metrics")
    if whole and not whole["equal"]:
        out.append(f"whole run: oodguard_requests_total by code {whole['metrics_by_code']} differs from what the "
                   f"client saw {whole['client_by_code']} (calls refused by gRPC before the handler are left out "
                   "of the client's count; the rest is a call the gateway counted under another code than the client "
                   "got)")
    for name, info in report.get("gateway_log", {}).items():
        if info["tracebacks"] or info["errors"]:
            out.append(f"gateway {name} log: {info['tracebacks']} tracebacks, {info['errors']} ERROR lines, first: "
                       f"{info['first_problems'][:3]}")
    for phase in report["bomb_memory"]:
        m = phase["memory"]
        in_flight_mb = phase["senders"] * phase["request_bytes"] / MiB
        growth = m["rss_peak_sampled_mb"] - m["rss_before_mb"]
        if in_flight_mb >= 1 and growth > RSS_FINDING_FACTOR * in_flight_mb:
            out.append(f"bomb memory ({phase['phase']}): the gateway's RSS grew by {growth:.0f} MB "
                       f"({growth / in_flight_mb:.0f}x the {in_flight_mb:.0f} MB of request bodies in flight) although "
                       "every bomb was refused from its header, no pixel decoded: the bodies of refused requests are "
                       "held (or their memory kept) far beyond the call")
    for name, rc in report.get("gateway_exit_codes", {}).items():
        if rc not in (0, None):
            out.append(f"gateway {name} exited with {rc} (0 expected: it died, or did not drain on SIGTERM)")
    if report["meta"].get("gateway_restarts"):
        out.append(f"gateways restarted after dying: {report['meta']['gateway_restarts']}")
    return out


def scan_log(path: Path) -> dict:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    interesting = [ln for ln in lines if "Traceback" in ln or " ERROR " in ln or "CRITICAL" in ln]
    return {"lines": len(lines), "tracebacks": text.count("Traceback"), "errors": sum(" ERROR " in ln for ln in lines),
            "warnings": sum(" WARNING " in ln for ln in lines), "first_problems": interesting[:10],
            "tail": lines[-20:]}


def ensure_repository(args, work: Path) -> Path:
    if args.repository:
        return args.repository.resolve()
    repository = work / "repository"
    log(f"exporting the digits demo into {repository} (oodguard export --demo digits)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OODGUARD_")}
    done = subprocess.run([sys.executable, "-m", "oodguard.cli", "export", "--demo", "digits", "--repository",
                           str(repository)], cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"export failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return repository


def model_spec(channel, model: str) -> tuple[str, tuple[int, ...], int]:
    """(model name, per-item input shape, max batch size) from the gateway's ModelInfo."""
    from oodguard.serve.v1 import oodguard_pb2 as pb

    raw = channel.unary_unary(f"/{SERVICE}/ModelInfo", request_serializer=None, response_deserializer=None)(
        pb.ModelInfoRequest(model=model).SerializeToString(), timeout=10)
    info = pb.ModelInfoResponse.FromString(raw)
    spec = info.models[0]
    latest = [v for v in spec.versions if v.version == spec.latest_version][0]
    return spec.name, tuple(latest.input.shape), latest.input.max_batch_size


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> dict:
    began, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S")
    with ExitStack() as stack:
        if args.work:
            args.work.mkdir(parents=True, exist_ok=True)
            work = args.work.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="oodguard-hostile-")))
        repository = ensure_repository(args, work)
        fleet = Fleet(repository, work, args.serve_arg)
        stack.callback(fleet.close)
        fleet.start("main")
        if not args.no_auth_gateway:
            fleet.start("auth", token=AUTH_TOKEN)
        model, shape, max_batch = model_spec(fleet.channels["main"], args.model)
        log(f"model {model}: input {list(shape)}, max batch {max_batch}")
        inp = Inputs(model, shape)
        tallies = {name: Tally() for name in fleet.gateways}
        pid = fleet.gateways["main"].pid
        hwm_start, rss_start = proc_status_kb(pid, "VmHWM"), proc_status_kb(pid, "VmRSS")

        results = run_kinds(fleet, inp, max_batch, tallies)
        main = fleet.gateways["main"]
        hwm_after_kinds, rss_after_kinds = proc_status_kb(main.pid, "VmHWM"), proc_status_kb(main.pid, "VmRSS")
        bombs = [
            bomb_phase("3 bomb requests at once", main, inp, 3, 1, args.bomb_rounds * 4, args.good_requests,
                       tallies["main"]),
            bomb_phase("8 requests of 64 bombs at once", main, inp, 8, 64, args.bomb_rounds, args.good_requests,
                       tallies["main"]),
        ]
        vectors = vectors_part(main, inp, args.vector_rounds, args.quiet_seconds, tallies["main"], work)
        burst = burst_phase(main, inp, args.burst, args.burst_items, tallies["main"])
        redis_pause = (redis_pause_part(repository, work, args.serve_arg, inp, args.redis_pause_s)
                       if args.redis_pause_s > 0 else {"skipped": "--redis-pause-s 0"})
        metrics_total = {k: int(v) for k, v in sorted(scrape_requests_by_code(main).items()) if v}
        client_total = {k: v for k, v in sorted(tallies["main"].snapshot().items()) if v}
        report = {
            "meta": {"started": started, "python": platform.python_version(),
                     "machine": platform.machine(), "cpus": os.cpu_count(), "repository": str(repository),
                     "model": model, "input_shape": list(shape), "max_batch": max_batch,
                     "serve_args": args.serve_arg, "burst": args.burst, "burst_items": args.burst_items,
                     "bomb_rounds": args.bomb_rounds, "auth_gateway": not args.no_auth_gateway,
                     "png_bomb_bytes": len(inp.png_bomb), "jpeg_bomb_bytes": len(inp.jpeg_bomb),
                     "main_vmhwm_mb_at_start": round((hwm_start or 0) / 1024, 1),
                     "main_rss_mb_at_start": round((rss_start or 0) / 1024, 1),
                     "main_vmhwm_mb_after_kinds": round((hwm_after_kinds or 0) / 1024, 1),
                     "main_rss_mb_after_kinds": round((rss_after_kinds or 0) / 1024, 1),
                     "gateway_restarts": fleet.restarts},
            "kinds": [dict(asdict(r), healthy_after=r.healthy_after, allowed=r.allowed) for r in results],
            "bomb_memory": bombs,
            "attack_vectors": vectors,
            "burst": burst,
            "redis_pause": redis_pause,
            # a restarted gateway's counters start again from 0: the whole-run comparison then means nothing
            "whole_run_metrics": None if "main" in fleet.restarts else {
                "metrics_by_code": metrics_total, "client_by_code": client_total,
                "equal": metrics_total == client_total},
        }
        fleet.close()
        report["gateway_log"] = {gw.name: scan_log(gw.log_path) for gw in fleet.started}
        report["gateway_exit_codes"] = {gw.name: gw.process.returncode for gw in fleet.started}
    report["checks"] = checks(report)
    report["findings"] = findings(report)
    report["meta"]["seconds"] = round(time.perf_counter() - began, 1)
    return report


def render(report: dict, results_table: str) -> str:
    passed = all(report["checks"].values())
    lines = [f"# Hostile inputs against `oodguard serve` ({report['meta']['started']})", "",
             f"{len(report['kinds'])} kinds, model {report['meta']['model']} {report['meta']['input_shape']}, "
             f"max batch {report['meta']['max_batch']}; {report['meta']['cpus']} CPUs; "
             f"{report['meta']['seconds']:.0f} s in all. Codes in bold are outside the allowed set "
             f"({', '.join(ALLOWED_CODES)}; OK only with every item flagged where the input is absurd).", "",
             results_table, "", "## The last attack's vectors, alone and 4 at once", "",
             vectors_table(report["attack_vectors"]), "", "## Memory and burst", "", summary_text(report), "",
             "## Redis paused under flagged traffic", "", redis_text(report["redis_pause"]), "", "## Checks", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    lines += ["", "## Findings for the gateway owner", ""]
    lines += [f"- {f}" for f in report["findings"]] or ["- none"]
    lines += ["", "all checks passed" if passed else "SOME CHECKS FAILED"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGINT (even where a parent shell made it ignored) and SIGTERM -> the cleanup path of Ctrl-C; restored after
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _interrupt))}
    try:
        report = run(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    results = [KindResult(**{k: v for k, v in r.items() if k not in ("healthy_after", "allowed")})
               for r in report["kinds"]]
    text = render(report, kinds_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(text)
    print(text, end="")
    log(f"wrote {args.out / 'report.json'} and {args.out / 'report.md'}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
