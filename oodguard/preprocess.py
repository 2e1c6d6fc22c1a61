"""Explicit conversion of uint8 images to a model's float32 input, recorded with the model.

A :class:`Preprocessing` says what the model expects (channels, size, normalisation). Applying it to
images of another shape converts them in fixed, reported steps: channel conversion (RGB → grayscale by
ITU-R 601-2 luma, grayscale → RGB by repetition), bilinear resize, scaling to [0, 1], then
``(x - mean) / std`` per channel. The same object is stored in ``calibration.json`` so that the
gateway converts encoded images exactly as export and calibration did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

STEP_ORDER = "channels (luma or repeat), resize (bilinear), scale 1/255, (x - mean) / std"


@dataclass(frozen=True)
class Preprocessing:
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height and width must be positive, got {self.height}x{self.width}")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ValueError("mean and std need one value per channel, std > 0")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "order": STEP_ORDER}

    @classmethod
    def from_dict(cls, raw: dict) -> "Preprocessing":
        return cls(int(raw["channels"]), int(raw["height"]), int(raw["width"]), tuple(raw["mean"]), tuple(raw["std"]))

    def conversion_steps(self, image_shape: tuple[int, ...]) -> list[str]:
        """Human-readable steps that :meth:`apply` takes for images of ``image_shape`` ([H,W] or [H,W,C])."""
        height, width = image_shape[:2]
        channels = 1 if len(image_shape) == 2 else image_shape[2]
        steps = []
        if channels != self.channels:
            steps.append("RGB -> grayscale (luma)" if self.channels == 1 else "grayscale -> RGB (repeat)")
        if (height, width) != (self.height, self.width):
            steps.append(f"resize {height}x{width} -> {self.height}x{self.width} (bilinear)")
        return steps

    def apply(self, images: np.ndarray) -> np.ndarray:
        """A uint8 batch ``[N,H,W]`` / ``[N,H,W,1|3]`` → float32 ``[N,C,H,W]`` (a single image needs its batch axis)."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(f"images must be [N,H,W] or [N,H,W,3], got {images.shape}")
        converted = np.stack([self._convert_one(img) for img in images]) if len(images) else np.zeros(
            (0, self.height, self.width, self.channels), np.uint8
        )
        x = converted.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

    def to_size(self, images: np.ndarray) -> np.ndarray:
        """The channel and resize steps of :meth:`apply` alone: uint8 ``[N,H,W]`` / ``[N,H,W,3]`` at the model's
        size and channels (``[N,height,width]`` for one channel). ``apply`` of the result equals ``apply`` of
        the input: its resize step has nothing left to do."""
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if len(images) == 0:
            shape = (0, self.height, self.width) + ((3,) if self.channels == 3 else ())
            return np.zeros(shape, np.uint8)
        converted = np.stack([self._convert_one(img) for img in images])
        return converted[..., 0] if self.channels == 1 else converted

    def invert(self, model_input: np.ndarray) -> np.ndarray:
        """One model input ``[C,H,W]`` back to uint8 pixels (``[H,W]`` or ``[H,W,3]``) at the model's size:
        undoes the normalisation and scaling (resizing and channel conversion are not undone)."""
        x = np.asarray(model_input, np.float32).reshape(self.input_shape)
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        pixels = np.clip(np.round((x * std + mean) * 255.0), 0, 255).astype(np.uint8)
        return pixels[0] if self.channels == 1 else pixels.transpose(1, 2, 0)

    def _convert_one(self, image: np.ndarray) -> np.ndarray:
        pil = Image.fromarray(image)
        pil = pil.convert("L" if self.channels == 1 else "RGB")
        if pil.size != (self.width, self.height):
            pil = pil.resize((self.width, self.height), Image.Resampling.BILINEAR)
        out = np.asarray(pil, dtype=np.uint8)
        return out[..., None] if out.ndim == 2 else out
