import numpy as np
import onnx
import pytest
import torch

from oodguard.evaluation import VersionScorer, uniform_noise
from oodguard.export.backbones import Classifier, resnet18_cifar
from oodguard.export.fused import OPSET, FusedModel, export_onnx, output_names, run_torch
from oodguard.export.fitting import fit_scores
from oodguard.export.scores import MULTI_LAYER, SCORES, FitData, registry
from oodguard.export.scores.pvalue_fusion import PValueFusion, combine, log_p_values
from oodguard.export.train import extract
from oodguard.ood_metrics import auroc
from oodguard.onnx_runner import OnnxModel

EXPECTED_OUTPUTS = ["logits", "features", "sisom", "sisome", "energy", "msp", "maxlogit", "knn", "knn_centred",
                    "rel_mahalanobis", "cluster", "gradnorm", "fused"]
#: with ``oodguard export --multi-layer``
EXPECTED_OUTPUTS_ML = ["logits", "features", "sisom", "sisome", "sisom_ml", "sisome_ml", "energy", "msp", "maxlogit", "knn",
                       "knn_centred", "rel_mahalanobis", "cluster", "gradnorm", "fused"]


def assert_parity(reference: dict, actual: dict, tolerance: float = 1e-4, fusion=None) -> dict[str, float]:
    """Every output within 1e-4: absolute, or relative to the value where |value| > 1. The fused score is a
    step function of its components (a conformal p-value counts references), so a component a rounding
    error away from a reference may step: it is checked instead as the documented function of the ONNX
    graph's own component outputs (``fusion``: the fitted PValueFusion)."""
    errors = {}
    if fusion is not None:
        log_p = np.stack([log_p_values(getattr(fusion, f"references_{j}").numpy(), actual[name], fusion.tails[j])
                          for j, name in enumerate(fusion.components)], axis=1)
        np.testing.assert_allclose(actual["fused"], combine(log_p, fusion.combination), rtol=1e-5, atol=1e-5)
        reference = {k: v for k, v in reference.items() if k != "fused"}
    for name, ref in reference.items():
        scale = np.maximum(1.0, np.abs(ref))
        errors[name] = float(np.max(np.abs(actual[name] - ref) / scale))
        assert errors[name] <= tolerance, f"{name}: error {errors[name]:.2e}"
    return errors


def _batches(prep, record, seed=0):
    images = prep.apply(record.part(record.dataset(), "test").images)
    noise = prep.apply(uniform_noise(64, (8, 8), seed).images)
    mixed = np.concatenate([images[:32], noise[:32]])
    return {1: images[:1], 7: images[7:14], 64: mixed}


def test_onnx_outputs_names_shapes_and_single_file(digits_export):
    _, result, _, _ = digits_export
    path = result.version_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == EXPECTED_OUTPUTS
    assert [i.name for i in model.graph.input] == ["input"]
    assert model.opset_import[0].version == OPSET
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert sorted(p.name for p in result.version_dir.iterdir()) == ["calibration.json", "model.onnx", "model.py"]
    session = OnnxModel(path).session
    assert all(o.type == "tensor(float)" for o in session.get_outputs())
    shapes = {o.name: o.shape for o in session.get_outputs()}
    assert shapes["logits"][1:] == [8] and shapes["features"][1:] == [84]
    assert all(len(shapes[name]) == 1 for name in registry())


@pytest.mark.parametrize("multi_layer", [False, True], ids=["default", "multi-layer"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_parity_with_pytorch_lenet(request, batch, multi_layer):
    record, result, _, _ = request.getfixturevalue("digits_export_ml" if multi_layer else "digits_export")
    scorer = VersionScorer(result.version_dir)
    images = _batches(scorer.preprocessing, record)[batch]
    assert len(images) == batch
    reference = run_torch(result.model, images)
    actual = scorer.model.run(images)
    assert list(actual) == (EXPECTED_OUTPUTS_ML if multi_layer else EXPECTED_OUTPUTS)
    assert_parity(reference, actual, fusion=result.model.scores["fused"])


def test_every_score_ranks_uniform_noise_above_held_out_id(digits_export):
    record, result, _, _ = digits_export
    scorer = VersionScorer(result.version_dir)
    in_dist = scorer.score("id", record.part(record.dataset(), "test"))
    noise = scorer.score("noise", uniform_noise(300, (8, 8), seed=3))
    for name in registry():
        assert np.median(noise.scores[name]) > np.median(in_dist.scores[name]), name
        assert auroc(in_dist.scores[name], noise.scores[name]) > 0.7, name


def test_parity_with_pytorch_resnet18_cifar(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    classifier = Classifier(resnet18_cifar(), 4).eval()
    images = rng.normal(size=(96, 3, 32, 32)).astype(np.float32)
    labels = np.repeat(np.arange(4), 24)
    features, logits = extract(classifier, images)
    data = FitData(features, logits, labels, np.arange(96), classifier.head.weight.detach().numpy(),
                   classifier.head.bias.detach().numpy(), features[:20] * 2, logits[:20] * 2)
    scores = fit_scores(data, {"knn": {"k": 5}})
    components = FusedModel(classifier, scores).eval()
    references = run_torch(components, rng.normal(size=(40, 3, 32, 32)).astype(np.float32))
    ood = run_torch(components, rng.normal(size=(20, 3, 32, 32)).astype(np.float32) * 3)
    groups = np.array(["near", "far"] * 10, dtype=object)
    fusion = PValueFusion.from_references({n: references[n] for n in scores}, {n: ood[n] for n in scores}, groups,
                                          components=("sisome", "energy", "knn"))
    model = FusedModel(classifier, {**scores, "fused": fusion}).eval()
    path = export_onnx(model, (3, 32, 32), tmp_path / "model.onnx")
    session = OnnxModel(path)
    for batch in (1, 7, 64):
        x = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
        assert_parity(run_torch(model, x), session.run(x), fusion=fusion)
    assert output_names(model.score_names) == EXPECTED_OUTPUTS


def test_the_backward_pass_is_in_the_graph_only_for_a_multi_layer_export_of_a_backbone_with_layer_stages(
        digits_export, digits_export_ml, tmp_path):
    """The default export is the forward pass alone (no layer scores). With --multi-layer, LeNet-5 names its
    layers and the graph differentiates through them (ReLU masks: Greater; into conv1 the summed VJP, so no
    ConvTranspose). A backbone without sisom_stages gets penultimate-only multi-layer scores and a forward-only
    graph."""
    def ops(result):
        return [node.op_type for node in onnx.load(str(result.version_dir / "model.onnx")).graph.node]

    _, default, _, _ = digits_export
    assert default.model.layer_names == () and not set(MULTI_LAYER) & set(default.model.score_names)
    _, result, _, _ = digits_export_ml
    assert result.model.layer_names == ("conv1", "conv2", "fc1", "penultimate")
    # the backward pass: a ReLU mask (Greater) for each of the three ReLUs it goes back through
    assert ops(result).count("Greater") == ops(default).count("Greater") + 3

    class Plain(torch.nn.Module):
        feature_dim = 4

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                            torch.nn.Flatten())

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    classifier = Classifier(Plain(), 3).eval()
    images = np.random.default_rng(0).normal(size=(30, 1, 8, 8)).astype(np.float32)
    features, logits = extract(classifier, images)
    data = FitData(features, logits, np.arange(30) % 3, np.arange(30), classifier.head.weight.detach().numpy(),
                   classifier.head.bias.detach().numpy())
    # k = 3 for both kNN scores: the inputs are bank samples, and at k = 1 an input's distance to itself,
    # sqrt(2 - 2 cos) at cos ~ 1, is rounding noise amplified by the square root (3e-4 apart between runtimes)
    model = FusedModel(classifier, fit_scores(data, {"knn": {"k": 3}, "knn_centred": {"k": 3}},
                                              multi_layer=True)).eval()
    assert model.layer_names == ("penultimate",)
    path = export_onnx(model, (1, 8, 8), tmp_path / "plain.onnx")
    assert "ConvTranspose" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    assert_parity(run_torch(model, images[:7]), OnnxModel(path).run(images[:7]))
