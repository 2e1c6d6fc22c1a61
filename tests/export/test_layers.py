"""Per-layer pooled activations and gradients: the hand-written backward pass against torch.autograd.grad on
the PyTorch module itself (hooks on its own submodules, not on sisom_stages), in PyTorch and in ONNX Runtime,
for LeNet-5 and the CIFAR ResNet-18, random and trained weights, batches 1, 7 and 64."""

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from oodguard.export import layers
from oodguard.export.backbones import Classifier, lenet5, resnet18_cifar
from oodguard.export.fused import export_module
from oodguard.onnx_runner import OnnxModel
from layer_reference import autograd_reference

BATCHES = (1, 7, 64)
LENET_LAYERS = ("conv1", "conv2", "fc1", "penultimate")
RESNET_LAYERS = ("layer1", "layer2", "layer3", "penultimate")


def _images(shape, batch, seed):
    """Normal noise, with a constant background in every other image (ties in LeNet's max-pools)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    x[::2, :, : shape[1] // 2] = -0.4
    return torch.as_tensor(x)


def _trained(classifier, shape, steps):
    """A few SGD steps on random labels (BatchNorm statistics move too), then eval mode."""
    torch.manual_seed(1)
    optimiser = torch.optim.SGD(classifier.parameters(), lr=0.05, momentum=0.9)
    classifier.train()
    for step in range(steps):
        x = _images(shape, 16, seed=100 + step)
        loss = nn.functional.cross_entropy(classifier(x), torch.randint(0, classifier.num_classes, (16,)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return classifier.eval()


@pytest.fixture(scope="module", params=["lenet5-random", "lenet5-trained", "resnet18-random", "resnet18-trained"])
def model(request):
    torch.manual_seed(0)
    name, weights = request.param.split("-")
    backbone, shape = (lenet5(), (1, 28, 28)) if name == "lenet5" else (resnet18_cifar(), (3, 32, 32))
    classifier = Classifier(backbone, 10).eval()
    if weights == "trained":
        _trained(classifier, shape, steps=20 if name == "lenet5" else 3)
    return classifier, shape


def _relative_error(actual, expected, scale=None):
    """The largest absolute error relative to the largest expected magnitude, or to the largest of ``scale``
    (gradients of early layers are ~1e-6, so an absolute tolerance would say nothing)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected) if scale is None else np.asarray(scale, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(scale)), 1e-30))


def test_layer_names():
    assert layers.names(lenet5()) == LENET_LAYERS
    assert layers.names(resnet18_cifar()) == RESNET_LAYERS


@pytest.mark.parametrize("batch", BATCHES)
def test_gradients_equal_autograd(model, batch):
    classifier, shape = model
    x = _images(shape, batch, seed=batch)
    with torch.no_grad():
        features, logits, out = layers.pooled(classifier, x, layers.names(classifier.backbone))
        torch.testing.assert_close(features, classifier.backbone(x), rtol=0, atol=0)
    reference = autograd_reference(classifier, x)
    assert list(out) == list(reference)
    for name, (a, g, _) in reference.items():
        assert _relative_error(out[name][0], a) == 0.0, name
        assert float(g.abs().max()) > 0, name
        assert _relative_error(out[name][1], g) < 1e-4, name


class PooledLayers(nn.Module):
    """The pooled activations and gradients as graph outputs, to check them in ONNX Runtime."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.names = layers.names(classifier.backbone)

    def forward(self, input):
        _, _, out = layers.pooled(self.classifier, input, self.names)
        return tuple(t for name in self.names for t in out[name])


def test_onnx_runtime_gradients_equal_autograd(model, tmp_path):
    """Against float64 autograd (the truth), relative to ``mean_hw |dL/dA|`` (the size of what is averaged: a
    spatial mean of signed gradients cancels, ResNet-18 layer1 entries ~1e-7 against a mean ~1e-8). A float32
    forward pass (PyTorch's or ONNX Runtime's) puts a few ReLU inputs within rounding of 0 on the other side
    than float64 does (2 of ~10^7 on a batch of 64 ResNet inputs), which moves the gradients it reaches by up
    to ~1/(h*w) of that size in every channel of that input, float32 autograd alike; so all inputs but one (or 5%)
    must be within 1e-4 in every entry, and every entry within 3e-3 (a wrong VJP is off by O(1) almost everywhere)."""
    classifier, shape = model
    truth_model = copy.deepcopy(classifier).double()
    wrapper = PooledLayers(classifier).eval()
    outputs = [f"{kind}_{name}" for name in wrapper.names for kind in ("a", "g")]
    path = export_module(wrapper, shape, tmp_path / "layers.onnx", outputs)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    if shape[0] == 3:  # the backward pass is in the graph
        assert "ConvTranspose" in ops
    else:  # LeNet-5: into conv1 only the summed VJP of conv2's stage (vjp.taped_sum): ReLU masks, no ConvTranspose
        assert "Greater" in ops and "ConvTranspose" not in ops
    session = OnnxModel(path)
    for batch in BATCHES:
        x = _images(shape, batch, seed=10 + batch)
        actual = session.run(x.numpy())
        truth = autograd_reference(truth_model, x.double())
        for name, (a, g, size) in truth.items():
            assert _relative_error(actual[f"a_{name}"], a) < 1e-4, (name, batch)
            errors = np.abs(actual[f"g_{name}"] - g.numpy()) / float(size.max())
            flipped = int(np.sum(errors.max(axis=1) >= 1e-4))  # the thread count decides which inputs flip
            assert flipped <= max(1, batch // 20) and errors.max() < 3e-3, (name, batch, flipped, errors.max())


def test_check_accepts_the_builtin_backbones_and_refuses_a_wrong_vjp(model, monkeypatch):
    classifier, shape = model
    x = _images(shape, 4, seed=3).numpy()
    errors = layers.check(classifier, x)
    assert set(errors) == set(layers.names(classifier.backbone)) and max(errors.values()) < 1e-4
    real = layers.vjp.taped

    def wrong_relu(module, h):  # a VJP that forgets the ReLU mask
        if isinstance(module, nn.ReLU):
            return module(h), lambda g: g
        return real(module, h)

    monkeypatch.setattr(layers.vjp, "taped", wrong_relu)
    with pytest.raises(ValueError, match="differ from autograd"):
        layers.check(classifier, x)


class Unnamed(nn.Module):
    """A user backbone without sisom_stages."""

    feature_dim = 6

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x)


class Miswired(Unnamed):
    """Stages that do not compose to the forward pass."""

    def sisom_stages(self):
        return [("conv", [self.body[0]]), (None, [self.body[2], self.body[3]])]


def test_a_backbone_without_stages_has_the_penultimate_layer_only():
    classifier = Classifier(Unnamed(), 3).eval()
    assert layers.names(classifier.backbone) == ("penultimate",)
    x = torch.randn(5, 1, 8, 8)
    assert layers.extract(classifier, x.numpy()) is None
    with torch.no_grad():
        features, logits, out = layers.pooled(classifier, x, ("penultimate",))
        expected = (torch.softmax(logits, 1) - 1 / 3) @ classifier.head.weight
    assert list(out) == ["penultimate"]
    torch.testing.assert_close(out["penultimate"][1], expected)


def test_stages_that_do_not_compose_to_the_forward_pass_are_refused():
    with pytest.raises(ValueError, match="does not compose"):
        layers.check(Classifier(Miswired(), 3).eval(), np.random.default_rng(0).normal(size=(2, 1, 8, 8)))


def test_extract_matches_pooled_in_batches(model):
    classifier, shape = model
    x = _images(shape, 70, seed=5)
    extracted = layers.extract(classifier, x.numpy(), batch_size=32)
    with torch.no_grad():
        _, _, out = layers.pooled(classifier, x, layers.names(classifier.backbone))
    for name in out:  # batch-size dependent kernels: rounding only
        for i in range(2):
            assert _relative_error(extracted[name][i], out[name][i]) < 1e-5, name
