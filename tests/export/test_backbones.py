"""Backbones, the Classifier wrapper, factory resolution and checkpoint loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from oodguard.export import backbones
from oodguard.export.backbones import (
    BUILTIN_BACKBONES,
    CheckpointError,
    CifarResNet18,
    Classifier,
    LeNet5,
    file_sha256,
    lenet5,
    load_classifier,
    resnet18_cifar,
    resolve_factory,
    save_checkpoint,
)


@pytest.fixture
def lenet_classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(lenet5(), num_classes=3).eval()


@pytest.fixture
def lenet_ckpt(tmp_path: Path, lenet_classifier: Classifier) -> Path:
    path = tmp_path / "lenet.pt"
    save_checkpoint(lenet_classifier, path)
    return path


def _load_error(*args, **kwargs) -> str:
    """Call load_classifier expecting a CheckpointError; return its (single-line) message."""
    with pytest.raises(CheckpointError) as info:
        load_classifier(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- backbones -------------------------------------------------------------------------------


def test_lenet5_features_shape() -> None:
    net = lenet5()
    assert isinstance(net, LeNet5)
    assert (net.feature_dim, net.input_shape) == (84, (1, 28, 28))
    out = net(torch.randn(2, *net.input_shape))
    assert out.shape == (2, 84)
    assert (out >= 0).all()  # ends in a ReLU


@pytest.mark.parametrize("factory", [lenet5, resnet18_cifar])
def test_sisom_stages_compose_to_the_forward_pass(factory) -> None:
    """The multi-layer SISOM protocol: the stages, applied in order, are the backbone (same values)."""
    from oodguard.export import vjp

    net = factory().eval()
    x = torch.randn(3, *net.input_shape)
    h = x
    for _, stage in net.sisom_stages():
        h = vjp.run(stage, h)
    with torch.no_grad():
        torch.testing.assert_close(h, net(x), rtol=0, atol=0)


def test_resnet18_cifar_features_shape() -> None:
    net = resnet18_cifar().eval()
    assert isinstance(net, CifarResNet18)
    assert (net.feature_dim, net.input_shape) == (512, (3, 32, 32))
    out = net(torch.randn(2, *net.input_shape))
    assert out.shape == (2, 512)
    # The well-known 11,173,962 of CIFAR ResNet-18 minus its 512x10 + 10 classifier.
    assert sum(p.numel() for p in net.parameters()) == 11_168_832


def test_resnet18_cifar_exports_to_onnx_with_dynamo(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = Classifier(resnet18_cifar(), num_classes=10).eval()
    path = tmp_path / "resnet.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 3, 32, 32),), str(path), dynamo=True, dynamic_shapes=({0: "batch"},), verbose=False
    )
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_classifier_forward_is_head_of_features(lenet_classifier: Classifier) -> None:
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats = lenet_classifier.features(x)
        logits = lenet_classifier(x)
        torch.testing.assert_close(logits, lenet_classifier.head(feats))
    assert feats.shape == (2, 84) and logits.shape == (2, 3)
    assert (lenet_classifier.num_classes, lenet_classifier.feature_dim) == (3, 84)


def test_classifier_needs_feature_dim_for_unannotated_backbone() -> None:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 7))
    with pytest.raises(ValueError, match="pass feature_dim="):
        Classifier(backbone, num_classes=2)
    model = Classifier(backbone, num_classes=2, feature_dim=7)
    assert model(torch.randn(5, 2, 2)).shape == (5, 2)
    assert model.feature_dim == 7


# --- resolve_factory ---------------------------------------------------------------------------


def test_resolve_factory_builtin_and_dotted() -> None:
    assert set(BUILTIN_BACKBONES) == {"lenet5", "resnet18_cifar"}
    assert resolve_factory("lenet5") is backbones.lenet5
    assert resolve_factory("resnet18_cifar") is backbones.resnet18_cifar
    assert resolve_factory("oodguard.export.backbones:lenet5") is backbones.lenet5
    assert resolve_factory("oodguard.export.backbones:LeNet5") is LeNet5


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("lenet", "neither a builtin"),
        ("oodguard.export.backbones", "package.module:factory"),
        (":lenet5", "package.module:factory"),
        ("a:b:c", "package.module:factory"),
        ("no_such_module_xyz.sub:make", "cannot import module 'no_such_module_xyz.sub'"),
        ("oodguard.export.backbones:nope", "has no attribute 'nope'"),
        ("oodguard.export.backbones:BUILTIN_BACKBONES", "not callable"),
    ],
)
def test_resolve_factory_errors(ref: str, needle: str) -> None:
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        resolve_factory(ref)


# --- checkpoints -------------------------------------------------------------------------------


def test_save_then_load_gives_identical_logits(lenet_classifier: Classifier, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    digest = save_checkpoint(lenet_classifier, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)

    loaded = load_classifier("lenet5", path, num_classes=3)
    assert not loaded.training
    assert (loaded.num_classes, loaded.feature_dim) == (3, 84)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), lenet_classifier(x), rtol=0, atol=0)


def test_load_accepts_wrapped_state_dict(lenet_classifier: Classifier, tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": lenet_classifier.state_dict(), "epoch": 3}, path)
    loaded = load_classifier("oodguard.export.backbones:lenet5", path)
    assert loaded.num_classes == 3
    torch.testing.assert_close(loaded.head.weight, lenet_classifier.head.weight, rtol=0, atol=0)


def test_load_wrong_class_count(lenet_ckpt: Path) -> None:
    message = _load_error("lenet5", lenet_ckpt, num_classes=10)
    assert message == "checkpoint has 3 classes but 10 class names were given"


def test_load_lenet_checkpoint_into_resnet(lenet_ckpt: Path) -> None:
    message = _load_error("resnet18_cifar", lenet_ckpt)
    assert "84-d" in message and "512-d" in message and "resnet18_cifar" in message


def test_load_tensor_shape_mismatch(lenet_classifier: Classifier, tmp_path: Path) -> None:
    state = lenet_classifier.state_dict()
    state["backbone.fc.1.weight"] = torch.zeros(120, 399)
    path = tmp_path / "bad_shape.pt"
    torch.save(state, path)
    message = _load_error("lenet5", path)
    assert "'backbone.fc.1.weight'" in message
    assert "(120, 399)" in message and "(120, 400)" in message


def test_load_missing_and_unexpected_keys(lenet_classifier: Classifier, tmp_path: Path) -> None:
    state = lenet_classifier.state_dict()
    del state["backbone.conv.0.bias"]
    state["backbone.extra.weight"] = torch.zeros(1)
    path = tmp_path / "keys.pt"
    torch.save(state, path)
    message = _load_error("lenet5", path)
    assert "missing keys: backbone.conv.0.bias" in message
    assert "unexpected keys: backbone.extra.weight" in message


def test_load_missing_keys_listing_is_truncated(lenet_classifier: Classifier, tmp_path: Path) -> None:
    state = {k: v for k, v in lenet_classifier.state_dict().items() if k.startswith("head.")}
    path = tmp_path / "head_only.pt"
    torch.save(state, path)
    message = _load_error("lenet5", path)
    assert "missing keys: backbone.conv.0.bias" in message
    assert "(8 in all)" in message  # LeNet5 has 4 conv + 4 fc tensors; only 5 are named


def test_load_missing_file(tmp_path: Path) -> None:
    message = _load_error("lenet5", tmp_path / "absent.pt")
    assert "absent.pt" in message and "does not exist" in message


def test_load_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint\x00\x01\x02")
    assert "weights_only=True" in _load_error("lenet5", path)


class _Opaque:
    """A pickled object that weights_only loading must refuse."""


def test_load_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": _Opaque()}, path)
    message = _load_error("lenet5", path)
    assert "not loadable with torch.load(weights_only=True)" in message
    assert "Unsupported global" in message and "_Opaque" in message


def test_load_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    assert "is not a state dict" in _load_error("lenet5", path)


def test_load_without_head_weight(lenet_classifier: Classifier, tmp_path: Path) -> None:
    state = lenet_classifier.state_dict()
    del state["head.weight"]
    path = tmp_path / "nohead.pt"
    torch.save(state, path)
    assert "has no 'head.weight'" in _load_error("lenet5", path)


def test_load_factory_returning_non_module(lenet_ckpt: Path) -> None:
    assert "returned dict, not a torch.nn.Module" in _load_error("builtins:dict", lenet_ckpt)
