"""What a Predict request may carry, and its conversion to the model's float32 input (no gRPC, no asyncio).

Every limit here is checked before the work it protects: the request id and metadata sizes before anything
is stored, an encoded image's format and pixel count from its header before it is decoded (a 464-byte PNG
may declare 13000 x 13000 pixels: 507 MB once decoded), the pixels of all images of a request together
before the first is decoded. Raising :class:`InputError` means gRPC ``INVALID_ARGUMENT``; its ``reason`` is
a short, bounded label for the metrics. Client strings quoted in messages are truncated (:func:`quote`).
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .image_structure import TooManyChunks, check_structure
from .quoting import quote
from .v1 import oodguard_pb2 as pb

if TYPE_CHECKING:  # pragma: no cover (a type only: the registry imports nothing from here)
    from .registry import ServedVersion

FLOAT_DTYPES = ("float32", "fp32")
UINT8_DTYPES = ("uint8",)
#: the encoded formats the API names (Pillow's format names); anything else is refused from its header
IMAGE_FORMATS = ("PNG", "JPEG")
#: The most PNG text (tEXt, zTXt, iTXt: metadata the guard never reads) one image may carry, inflated. Pillow
#: inflates and keeps it while opening the header (its own limit is 64 MiB per image), so a 1 MB request of
#: compressed text chunks could cost gigabytes before any pixel limit applies; past this, the image is refused.
MAX_PNG_TEXT_BYTES = 64 * 1024
#: the most request metadata entries (keys): far above any client's labels, and a bound on the body's walk
MAX_METADATA_ENTRIES = 1024
#: the most dimensions a tensor's shape may have ([B,C,H,W] and [B,H,W,C] have 4)
MAX_TENSOR_DIMS = 8
PngImagePlugin.MAX_TEXT_CHUNK = MAX_PNG_TEXT_BYTES  # process-wide: serving reads no PNG text anywhere
PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES


class InputError(ValueError):
    """The request's input is malformed or above a limit (gRPC INVALID_ARGUMENT); ``reason`` labels it."""

    def __init__(self, message: str, reason: str = "input"):
        super().__init__(message)
        self.reason = reason


class Abandoned(Exception):
    """The request gave up (cancelled, deadline passed) while its images were being decoded."""


@dataclass(frozen=True)
class InputLimits:
    """Sizes a request may not exceed (see :class:`oodguard.serve.settings.Settings` for the defaults)."""

    max_request_id_bytes: int = 256
    max_metadata_bytes: int = 16 * 1024
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 64 * 1024 * 1024

    @property
    def max_image_side(self) -> int:
        """The longest side an image may have: 4 times the side of the largest square image allowed (16384 with
        the defaults). A thin strip (1 x 16,000,000) passes the pixel limit, yet resizing it costs hundreds of
        megabytes and most of a second; no camera or scanner makes one."""
        return 4 * math.isqrt(self.max_image_pixels)

    @classmethod
    def from_settings(cls, settings) -> "InputLimits":
        return cls(settings.max_request_id_bytes, settings.max_metadata_bytes, settings.max_image_pixels,
                   settings.max_request_pixels)


def check_request_fields(request: pb.PredictRequest, limits: InputLimits) -> None:
    """The request id and metadata are stored with every queued record: bound their size."""
    rid = len(request.request_id.encode())
    if rid > limits.max_request_id_bytes:
        raise InputError(f"request_id is {rid} bytes, above the limit of {limits.max_request_id_bytes}",
                         "request_id_too_long")
    if len(request.metadata) > MAX_METADATA_ENTRIES:  # counted before walked
        raise InputError(f"metadata has {len(request.metadata)} entries; the limit is {MAX_METADATA_ENTRIES}",
                         "metadata_too_large")
    if request.metadata:
        size = sum(len(k.encode()) + len(v.encode()) for k, v in request.metadata.items())
        if size > limits.max_metadata_bytes:
            raise InputError(f"metadata is {size} bytes (keys and values), above the limit of "
                             f"{limits.max_metadata_bytes}", "metadata_too_large")


def item_count(request: pb.PredictRequest) -> int:
    """How many items the request carries (0 when it has no input or no shape)."""
    which = request.WhichOneof("input")
    if which == "images":
        return len(request.images.images)
    if which == "tensor" and request.tensor.shape:
        return max(0, int(request.tensor.shape[0]))
    return 0


def is_float_tensor(request: pb.PredictRequest) -> bool:
    return request.WhichOneof("input") == "tensor" and request.tensor.dtype.strip().lower() in FLOAT_DTYPES


def check_batch(size: int, served: "ServedVersion", what: str) -> None:
    if size == 0:
        raise InputError(f"empty batch: {what} holds no item")
    if size > served.max_batch:
        raise InputError(f"batch of {size} items is above the limit of {served.max_batch} for model "
                         f"{served.model!r} version {served.version}; split the request")


def _expected(served: "ServedVersion") -> str:
    return f"[B,{','.join(map(str, served.input_shape))}]"


def open_images(request: pb.PredictRequest, served: "ServedVersion", limits: InputLimits) -> list[Image.Image]:
    """Open every encoded image from its header only (no pixel decoded yet) and check its chunk counts, format
    and pixel limits. Usually cheap, but a large hostile request still costs milliseconds: run it in a worker
    thread."""
    blobs = request.images.images
    check_batch(len(blobs), served, "images")
    opened, total = [], 0
    for i, blob in enumerate(blobs):
        if not blob:
            raise InputError(f"image {i} is empty")
        try:
            check_structure(blob)
        except TooManyChunks as exc:
            raise InputError(f"image {i}: {exc}", "image_structure") from None
        try:
            image = Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            raise InputError(f"image {i} is not a PNG or JPEG image (the formats this API accepts)",
                             "image_format") from None
        except Image.DecompressionBombError:  # Pillow's own limit, far above ours: refuse it as ours
            raise InputError(f"image {i} declares more than {limits.max_image_pixels} pixels (limit per image)",
                             "image_too_large") from None
        except ValueError as exc:
            reason = str(exc).lower()
            if "text chunk" in reason or "decompressed data too large" in reason:  # Pillow's text limits
                raise InputError(f"image {i} carries more than {MAX_PNG_TEXT_BYTES} bytes of PNG text (metadata "
                                 "chunks; limit per image)", "image_too_large") from None
            raise InputError(f"image {i}: cannot read the image header (ValueError)") from None
        except Exception as exc:  # Pillow raises many types for a corrupt header
            raise InputError(f"image {i}: cannot read the image header ({type(exc).__name__})") from None
        width, height = image.size
        pixels = width * height
        if pixels > limits.max_image_pixels or min(width, height) < 1:
            raise InputError(f"image {i} declares {width}x{height} = {pixels} pixels; the limit is "
                             f"{limits.max_image_pixels} per image", "image_too_large")
        if max(width, height) > limits.max_image_side:
            raise InputError(f"image {i} is {width}x{height}: a side above {limits.max_image_side} pixels (4 times the "
                             "side of the largest square image allowed)", "image_too_large")
        total += pixels
        if total > limits.max_request_pixels:
            raise InputError(f"the request's images hold more than {limits.max_request_pixels} pixels together "
                             f"(limit per request); split it", "image_too_large")
        opened.append(image)
    return opened


def decode_images(images: list[Image.Image], served: "ServedVersion",
                  abandoned: threading.Event | None = None) -> np.ndarray:
    """Decode images opened by :func:`open_images` and convert them with the version's preprocessing to the
    model's ``[B, C, H, W]``. Runs in a worker thread; stops early (:class:`Abandoned`) once ``abandoned``
    is set. Only one image's pixels are held at a time."""
    converted = []
    for i, image in enumerate(images):
        if abandoned is not None and abandoned.is_set():
            raise Abandoned()
        try:
            with image:
                image.load()
                mode = "L" if image.mode in ("L", "1", "I;16", "I", "F", "LA") else "RGB"
                pixels = np.asarray(image.convert(mode), dtype=np.uint8)
        except Exception as exc:  # Pillow raises many types for corrupt data; never echo its buffer's repr
            raise InputError(f"image {i}: cannot decode image ({type(exc).__name__})") from None
        converted.append(served.preprocessing.apply(pixels[None]))
    return np.concatenate(converted)


def tensor_input(request: pb.PredictRequest, served: "ServedVersion", limits: InputLimits) -> np.ndarray:
    """The request's raw tensor as the model's float32 ``[B, C, H, W]``: float32 as is (a read-only view of
    the request's bytes), uint8 images through the version's preprocessing (call that in a worker thread)."""
    tensor = request.tensor
    dtype = tensor.dtype.strip().lower()
    if len(tensor.shape) > MAX_TENSOR_DIMS:  # counted before walked: a 15 M-entry shape would hold the loop
        raise InputError(f"tensor shape has {len(tensor.shape)} dimensions; inputs have at most {MAX_TENSOR_DIMS}")
    shape = [int(d) for d in tensor.shape]
    if dtype in FLOAT_DTYPES:
        np_dtype = np.dtype("<f4")
    elif dtype in UINT8_DTYPES:
        np_dtype = np.dtype("u1")
    else:
        raise InputError(f"unsupported dtype {quote(tensor.dtype)}: send float32 {_expected(served)} (preprocessed "
                         "model input) or uint8 images [B,H,W] / [B,H,W,C] (C = 1 or 3)")
    if not shape:
        raise InputError("tensor has no shape")
    if any(d < 0 for d in shape):
        raise InputError(f"tensor shape {shape[:8]} has a negative dimension")
    check_batch(shape[0], served, "the tensor")
    if np_dtype.kind == "f":
        if tuple(shape[1:]) != served.input_shape:
            raise InputError(f"float32 tensor of shape {shape[:8]} does not match the model input {_expected(served)} of "
                             f"model {served.model!r} version {served.version}")
    else:
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
            raise InputError(f"uint8 tensor of shape {shape[:8]}: images must be [B,H,W] or [B,H,W,C] with C = 1 or 3")
        if min(shape[1:3]) < 1:
            raise InputError(f"uint8 tensor of shape {shape} has an empty image dimension")
        if max(shape[1:3]) > limits.max_image_side:
            raise InputError(f"uint8 tensor of shape {shape}: an image side above {limits.max_image_side} pixels (4 "
                             "times the side of the largest square image allowed)", "image_too_large")
        if shape[1] * shape[2] > limits.max_image_pixels or shape[0] * shape[1] * shape[2] > limits.max_request_pixels:
            raise InputError(f"uint8 tensor of shape {shape}: images above the limit of {limits.max_image_pixels} "
                             f"pixels each or {limits.max_request_pixels} per request", "image_too_large")
    needed = math.prod(shape) * np_dtype.itemsize
    if len(tensor.data) != needed:
        raise InputError(f"tensor data holds {len(tensor.data)} bytes but shape {shape} of {dtype} needs {needed}")
    array = np.frombuffer(tensor.data, dtype=np_dtype).reshape(shape)
    if np_dtype.kind == "f":
        # a float64 sum of float32 values cannot overflow: it is finite exactly when every value is
        if not math.isfinite(array.sum(dtype=np.float64)):
            finite = np.isfinite(array)
            bad = int((~finite).sum())
            item = int(np.argwhere(~finite)[0][0])
            raise InputError(f"tensor holds {bad} NaN/Inf value(s) (first in item {item}); inputs must be finite")
        return array  # a read-only view of the request's bytes: nothing downstream writes to it
    return served.preprocessing.apply(array)


__all__ = ["MAX_METADATA_ENTRIES", "MAX_TENSOR_DIMS", "InputError", "InputLimits", "Abandoned", "check_request_fields",
           "check_batch", "item_count", "is_float_tensor",
           "open_images", "decode_images", "tensor_input", "quote", "IMAGE_FORMATS"]
