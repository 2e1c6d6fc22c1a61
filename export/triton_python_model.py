"""Triton python-backend model for the CPU configuration (``configs/cpu.pbtxt``): runs ``model.onnx`` with ONNX Runtime.

This file is not imported by oodguard. :func:`oodguard.export.triton_model.write_triton_model` copies it into
every version folder as ``<version>/model.py``; Triton's python backend imports it there when the model is
served with ``--model-config-name=cpu``. The production ONNX Runtime backend ignores it.

It runs inside the server's Python (numpy < 2, onnxruntime, ``triton_python_backend_utils``), so it must stay
self-contained: no oodguard imports. Behaviour matches the production onnxruntime backend:

* each request is validated on its own, and a bad one gets its own error response while the others are served;
* the valid requests of one ``execute`` call are concatenated along the batch axis and run once;
* every output comes back as ``[n] + dims`` of the config, so a ``[B]`` score declared
  ``dims: [1] reshape: { shape: [ ] }`` is returned as ``[B, 1]``.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

#: Triton config data types this model accepts, and their numpy types.
NUMPY_TYPES = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}


def _tensors(config, key):
    """(name, numpy dtype, dims) of each input or output declared in the config."""
    tensors = []
    for tensor in config.get(key, []):
        data_type = tensor.get("data_type", "TYPE_FP32")
        if data_type not in NUMPY_TYPES:
            raise ValueError(f"{key[:-1]} {tensor['name']!r}: data type {data_type} is not supported")
        tensors.append((tensor["name"], np.dtype(NUMPY_TYPES[data_type]), [int(d) for d in tensor.get("dims", [])]))
    return tensors


def _shape_matches(shape, expected):
    return len(shape) == len(expected) and all(want == -1 or got == want for got, want in zip(shape, expected))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.inputs = _tensors(config, "input")
        self.outputs = _tensors(config, "output")
        parameters = config.get("parameters") or {}
        threads = int((parameters.get("intra_op_num_threads") or {}).get("string_value") or 1)

        path = os.path.join(args["model_repository"], str(args["model_version"]), "model.onnx")
        options = ort.SessionOptions()
        # One thread by default: ONNX Runtime's spinning pool would burn a core beside the server's own threads.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        model_inputs = {arg.name for arg in self.session.get_inputs()}
        model_outputs = {arg.name for arg in self.session.get_outputs()}
        missing = [name for name, _, _ in self.inputs if name not in model_inputs]
        missing += [name for name, _, _ in self.outputs if name not in model_outputs]
        if missing:
            raise ValueError(f"{path}: tensor(s) {missing} are declared in the config but not in the model")
        self.output_names = [name for name, _, _ in self.outputs]

    def _validate(self, request):
        """The request's input arrays by name and its batch size, or an error message."""
        arrays, sizes = {}, set()
        for name, dtype, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return None, 0, f"missing input {name!r}"
            array = tensor.as_numpy()
            if array.dtype != dtype:
                return None, 0, f"input {name!r}: data type {array.dtype} but the model takes {dtype}"
            expected = ([-1] if self.max_batch_size > 0 else []) + dims
            if not _shape_matches(list(array.shape), expected):
                return None, 0, f"input {name!r}: shape {list(array.shape)} does not match {expected}"
            if self.max_batch_size > 0:
                if not 1 <= array.shape[0] <= self.max_batch_size:
                    return None, 0, (f"input {name!r}: batch size {array.shape[0]} is not within "
                                     f"1..max_batch_size={self.max_batch_size}")
                sizes.add(array.shape[0])
            arrays[name] = array
        if len(sizes) > 1:
            return None, 0, f"inputs have different batch sizes {sorted(sizes)}"
        return arrays, (sizes.pop() if sizes else 1), None

    def _response(self, results, start, stop):
        tensors = []
        for (name, dtype, dims), result in zip(self.outputs, results):
            part = result[start:stop] if self.max_batch_size > 0 else result
            shape = ([stop - start] if self.max_batch_size > 0 else []) + dims
            tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(part.reshape(shape), dtype=dtype)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(message):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []  # (request index, input arrays, batch size)
        for index, request in enumerate(requests):
            try:
                arrays, size, problem = self._validate(request)
            except Exception as exc:  # a malformed request must not take the others down
                arrays, size, problem = None, 0, f"cannot read the request: {exc}"
            if problem is None:
                valid.append((index, arrays, size))
            else:
                responses[index] = self._error(problem)
        if not valid:
            return responses

        try:
            if self.max_batch_size > 0:  # one run for the whole batch
                feed = {name: np.concatenate([arrays[name] for _, arrays, _ in valid]) for name, _, _ in self.inputs}
                results = self.session.run(self.output_names, feed)
                start = 0
                for index, _, size in valid:
                    responses[index] = self._response(results, start, start + size)
                    start += size
            else:  # no batch axis: one run per request
                for index, arrays, _ in valid:
                    responses[index] = self._response(self.session.run(self.output_names, arrays), 0, 0)
        except Exception as exc:
            for index, _, _ in valid:
                if responses[index] is None:
                    responses[index] = self._error(f"ONNX Runtime failed: {exc}")
        return responses

    def finalize(self):
        self.session = None
