"""OnnxModel on a tiny hand-built graph: outputs by name, batching that does not change results, input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from oodguard.onnx_runner import OnnxModel

WEIGHTS = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3)


def tiny_model(path: Path, input_names: tuple[str, ...] = ("input",)) -> Path:
    """input [N,4] -> features = relu(input) [N,4] -> logits = features @ W [N,3] -> energy = sum(logits) [N]."""
    nodes = [
        helper.make_node("Relu", [input_names[0]], ["features"]),
        helper.make_node("MatMul", ["features", "W"], ["logits"]),
        helper.make_node("ReduceSum", ["logits", "axes"], ["energy"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4]) for name in input_names],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("energy", TensorProto.FLOAT, ["N"]),
        ],
        initializer=[numpy_helper.from_array(WEIGHTS, "W"), numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    features = np.maximum(x, 0.0)
    logits = features @ WEIGHTS
    return {"logits": logits, "features": features, "energy": logits.sum(axis=1)}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> OnnxModel:
    return OnnxModel(tiny_model(tmp_path_factory.mktemp("onnx") / "model.onnx"), intra_op_threads=1)


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(37, 4)).astype(np.float32)


def test_outputs_by_name_in_graph_order(model):
    assert model.output_names == ["logits", "features", "energy"]
    assert model.input_shape == (4,)


def test_single_run_matches_numpy(model, inputs):
    out = model.run(inputs)
    expected = reference(inputs)
    assert {name: a.shape for name, a in out.items()} == {"logits": (37, 3), "features": (37, 4), "energy": (37,)}
    for name in expected:
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 5, 36, 37, 64])
def test_batching_does_not_change_results(model, inputs, batch_size):
    whole = model.run(inputs)
    batched = model.run(inputs, batch_size=batch_size)
    for name in whole:
        np.testing.assert_allclose(batched[name], whole[name], rtol=1e-6, atol=1e-7)


def test_float64_input_is_cast(model, inputs):
    np.testing.assert_array_equal(model.run(inputs.astype(np.float64))["energy"], model.run(inputs)["energy"])


def test_empty_input_raises(model):
    with pytest.raises(ValueError, match="no images"):
        model.run(np.zeros((0, 4), np.float32))


def test_other_input_name_raises(tmp_path):
    path = tiny_model(tmp_path / "model.onnx", input_names=("pixels",))
    with pytest.raises(ValueError, match=r"one input named 'input', got \['pixels'\]"):
        OnnxModel(path)


def test_two_inputs_raise(tmp_path):
    path = tiny_model(tmp_path / "model.onnx", input_names=("input", "extra"))
    with pytest.raises(ValueError, match=r"got \['input', 'extra'\]"):
        OnnxModel(path)


def test_spinning_can_be_switched_off_without_changing_results(tmp_path, inputs):
    path = tiny_model(tmp_path / "m.onnx")
    quiet = OnnxModel(path, spin=False)
    options = quiet.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError):  # the default session leaves ONNX Runtime's default (spinning) alone
        OnnxModel(path).session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    for name, value in reference(inputs).items():
        np.testing.assert_allclose(quiet.run(inputs)[name], value, rtol=1e-6)
