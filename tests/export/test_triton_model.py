"""The python-backend model.py (export/triton_python_model.py) without a server.

Triton's ``triton_python_backend_utils`` exists only inside the server, so a minimal stand-in is injected
into ``sys.modules``; tests/integration/test_triton.py runs the same file in a real tritonserver.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import json_format
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from oodguard.export.triton_config import ModelSignature, cpu_config
from oodguard.export.triton_model import MODEL_PY, model_source, write_triton_model
from oodguard.repository import CPU_CONFIG_FILE

# -- a minimal stand-in for triton_python_backend_utils ------------------------------------------------


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class TritonError:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors, error=None):
        self._tensors, self._error = list(output_tensors), error

    def output_tensors(self):
        return self._tensors

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


class InferenceRequest:
    def __init__(self, *tensors):
        self._tensors = tensors

    def inputs(self):
        return list(self._tensors)


def get_input_tensor_by_name(request, name):
    return next((t for t in request.inputs() if t.name() == name), None)


@pytest.fixture
def backend_utils(monkeypatch):
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.TritonError, module.InferenceResponse = Tensor, TritonError, InferenceResponse
    module.get_input_tensor_by_name = get_input_tensor_by_name
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def load_model_py(path: Path):
    spec = importlib.util.spec_from_file_location(f"triton_model_under_test_{id(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initialized(version_dir: Path, config_text: str):
    """model.py from ``version_dir``, initialized the way Triton does (config as JSON, int64 as strings)."""
    config = text_format.Parse(config_text, mc.ModelConfig())
    model = load_model_py(version_dir / MODEL_PY).TritonPythonModel()
    model.initialize({
        "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
        "model_repository": str(version_dir.parent),
        "model_version": version_dir.name,
        "model_instance_kind": "CPU",
        "model_instance_name": f"{config.name}_0_0",
    })
    return model


def outputs(response) -> dict[str, np.ndarray]:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


# -- a tiny model with the fused head's shape conventions: [B, K] tensor plus [B] scores -------------------

SIG = ModelSignature("tiny", (1, 2, 2), num_classes=3, feature_dim=4, scores=("top", "total"))


@pytest.fixture
def tiny_version(tmp_path, backend_utils) -> Path:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "w"], ["logits"]),
        helper.make_node("ReduceMax", ["logits"], ["top"], keepdims=0, axes=[1]),
        helper.make_node("ReduceSum", ["features", "axis1"], ["total"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("top", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel()),
         helper.make_tensor("axis1", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version = tmp_path / "tiny" / "1"
    version.mkdir(parents=True)
    onnx.save(model, str(version / "model.onnx"))
    write_triton_model(version)
    return version


def request(array):
    return InferenceRequest(Tensor("input", np.asarray(array, dtype=np.float32)))


def test_batches_requests_of_sizes_1_2_3_into_one_run_and_splits_them_back(tiny_version):
    model = initialized(tiny_version, cpu_config(SIG, max_batch_size=8, preferred_batch_sizes=(8,)))
    runs = []
    real_run = model.session.run
    model.session.run = lambda names, feed: runs.append(feed["input"].shape) or real_run(names, feed)

    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((n, 1, 2, 2)).astype(np.float32) for n in (1, 2, 3)]
    responses = model.execute([request(b) for b in batches])

    assert runs == [(6, 1, 2, 2)]  # one ONNX Runtime run for the three requests
    reference = ort.InferenceSession(str(tiny_version / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, response in zip(batches, responses):
        got = outputs(response)
        want = dict(zip(["logits", "features", "top", "total"], reference.run(None, {"input": batch})))
        n = len(batch)
        assert got["logits"].shape == (n, 3) and got["features"].shape == (n, 4)
        assert got["top"].shape == (n, 1) and got["total"].shape == (n, 1)  # dims: [1], reshape: []
        for name in want:
            np.testing.assert_allclose(got[name].reshape(want[name].shape), want[name], rtol=1e-6, atol=1e-6)
            assert got[name].dtype == np.float32


def test_a_bad_request_gets_its_own_error_and_the_others_are_served(tiny_version):
    model = initialized(tiny_version, cpu_config(SIG, max_batch_size=4, preferred_batch_sizes=(4,)))
    good = np.ones((2, 1, 2, 2), np.float32)
    responses = model.execute([
        request(good),
        request(np.ones((2, 5), np.float32)),  # wrong shape
        InferenceRequest(Tensor("other", good)),  # no "input"
        request(good.astype(np.float64).astype(np.float32)[:1]),
        InferenceRequest(Tensor("input", good.astype(np.float64))),  # wrong dtype
        request(np.ones((5, 1, 2, 2))),  # over max_batch_size
    ])
    assert [r.has_error() for r in responses] == [False, True, True, False, True, True]
    messages = [r.error().message() for r in responses if r.has_error()]
    assert "shape [2, 5]" in messages[0] and "missing input 'input'" in messages[1]
    assert "data type float64" in messages[2] and "max_batch_size=4" in messages[3]
    assert outputs(responses[0])["top"].shape == (2, 1) and outputs(responses[3])["top"].shape == (1, 1)
    assert model.execute([request(np.ones((3,)))])[0].has_error()  # only bad requests: no run at all


def test_onnx_runtime_failure_becomes_an_error_response_per_request(tiny_version):
    model = initialized(tiny_version, cpu_config(SIG, max_batch_size=4, preferred_batch_sizes=(4,)))

    def fail(names, feed):
        raise RuntimeError("boom")

    model.session.run = fail
    responses = model.execute([request(np.ones((1, 1, 2, 2))), request(np.ones((2, 1, 2, 2)))])
    assert all(r.has_error() and "boom" in r.error().message() for r in responses)


def test_thread_count_comes_from_the_config_parameter(tiny_version):
    model = initialized(tiny_version, cpu_config(SIG, intra_op_threads=3))
    assert model.session.get_session_options().intra_op_num_threads == 3


def test_a_config_output_missing_from_the_model_fails_initialize(tiny_version):
    wrong = ModelSignature("tiny", (1, 2, 2), 3, 4, scores=("top", "absent"))
    with pytest.raises(ValueError, match="absent"):
        initialized(tiny_version, cpu_config(wrong))


def test_digits_model_matches_onnx_runtime_with_the_exported_cpu_config(digits_export, backend_utils):
    _, result, _, _ = digits_export
    model = initialized(result.version_dir, (result.version_dir.parent / CPU_CONFIG_FILE).read_text())
    batch = np.random.default_rng(2).standard_normal((5, 1, 28, 28)).astype(np.float32)
    got = outputs(model.execute([request(batch[:2]), request(batch[2:])])[0])
    reference = ort.InferenceSession(str(result.version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, {"input": batch[:2]})))
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].shape == ((2, 1) if array.ndim == 1 else array.shape)
        np.testing.assert_allclose(got[name].reshape(array.shape), array, rtol=1e-5, atol=1e-5)


def test_write_triton_model_writes_the_source_alone(tmp_path):
    path = write_triton_model(tmp_path)
    assert path == tmp_path / MODEL_PY and path.read_text() == model_source()
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_PY]  # no __pycache__ in a version folder


def _pycache_line() -> str:
    """The .pth line setup_triton.sh writes into the Triton environment."""
    import re

    line = re.search(r'^echo "(import sys; sys\.pycache_prefix = .*)" > "\$SITE/oodguard_pycache\.pth"$',
                     (Path(__file__).resolve().parents[2] / "scripts" / "setup_triton.sh").read_text(), re.M)
    assert line, "setup_triton.sh writes the .pth line"
    return line.group(1)


def test_a_pycache_prefix_keeps_bytecode_out_of_the_version_folder(tmp_path):
    """setup_triton.sh's .pth line, run as the stub's interpreter runs it at start (isolated, -I: no PYTHON*
    variables): importing a version's model.py writes its bytecode under the prefix, and the folder stays as
    it was (the real tritonserver: tests/integration/test_triton.py)."""
    prefix_line = _pycache_line().replace("$ENV_DIR", str(tmp_path / "env"))
    version = tmp_path / "1"
    version.mkdir()
    write_triton_model(version)
    (version / MODEL_PY).write_text("VALUE = 1\n")  # a stand-in that only imports: where does its bytecode go?
    subprocess.run([sys.executable, "-I", "-c", f"{prefix_line}; sys.path.insert(0, {str(version)!r}); import model; "
                    "assert model.VALUE == 1"], check=True, timeout=60)
    assert sorted(p.name for p in version.iterdir()) == [MODEL_PY]
    assert list((tmp_path / "env" / "pycache").rglob("model*.pyc")), "the bytecode went under the prefix"


def test_write_triton_model_needs_an_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_triton_model(tmp_path / "missing")
