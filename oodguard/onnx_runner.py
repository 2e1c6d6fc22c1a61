"""Run a fused-head ONNX model with ONNX Runtime, by name, in batches. No torch."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import progress
from .repository import INPUT_NAME


class OnnxModel:
    """An ONNX Runtime session over one ``model.onnx`` that returns every output by name."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, intra_op_threads: int = 0,
                 spin: bool = True):
        """``spin=False`` stops idle intra-op threads from busy-waiting for work: in a server that shares
        its cores with gRPC and Python threads, spinning burned most of a core per request stream."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ValueError(f"{path}: expected one input named {INPUT_NAME!r}, got {[i.name for i in inputs]}")
        self.input_shape = tuple(inputs[0].shape[1:])

    def run(self, images: np.ndarray, batch_size: int = 256, desc: str | None = None) -> dict[str, np.ndarray]:
        """Every output by name over ``images``, ``batch_size`` at a time; with ``desc``, a progress bar of that
        name counts the images (:mod:`oodguard.progress`: on a terminal only)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        chunks = []
        with progress.bar(len(images), desc, "img") if desc is not None else contextlib.nullcontext() as counted:
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                chunks.append(self.session.run(None, {INPUT_NAME: batch}))
                if counted is not None:
                    counted.update(len(batch))
        if not chunks:
            raise ValueError("no images to run")
        return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(self.output_names)}
