"""Triton configs generated from a ModelSignature: they parse back and say what the repository contract needs;
across versions they declare the outputs every served version has."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from oodguard.calibration import Calibration, ScoreThreshold
from oodguard.export.triton_config import ModelSignature, cpu_config, production_config, write_configs
from oodguard.repository import CALIBRATION_FILE, CONFIG_FILE, CPU_CONFIG_FILE

SIG = ModelSignature(name="cifar_resnet", input_dims=(3, 32, 32), num_classes=10, feature_dim=512,
                     scores=("sisom", "energy", "msp"))


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def check_common(config: mc.ModelConfig, max_batch_size: int = 64) -> None:
    """Name, tensors, batching and version policy shared by both configs."""
    assert config.name == "cifar_resnet"
    assert config.max_batch_size == max_batch_size
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("input", mc.TYPE_FP32, [3, 32, 32])]
    outputs = {t.name: t for t in config.output}
    assert list(outputs) == ["logits", "features", "sisom", "energy", "msp"]
    assert all(t.data_type == mc.TYPE_FP32 for t in config.output)
    # a variable class axis: versions of different class counts share the config
    assert list(outputs["logits"].dims) == [-1] and not outputs["logits"].HasField("reshape")
    assert list(outputs["features"].dims) == [512] and not outputs["features"].HasField("reshape")
    for score in SIG.scores:
        assert list(outputs[score].dims) == [1]
        assert outputs[score].HasField("reshape") and list(outputs[score].reshape.shape) == []
    assert config.HasField("dynamic_batching")
    assert config.version_policy.latest.num_versions == 2  # a client pinned to the previous version is served


def test_production_config():
    text = production_config(SIG)
    assert text.startswith("#") and "oodguard" in text.splitlines()[0]
    config = parse(text)
    check_common(config)
    assert config.platform == "onnxruntime_onnx" and not config.backend
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert "reshape" in text


def test_production_config_batching_arguments():
    config = parse(production_config(SIG, max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=0))
    check_common(config, max_batch_size=8)
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 0


def test_cpu_config():
    config = parse(cpu_config(SIG, intra_op_threads=2))
    check_common(config)
    assert config.backend == "python" and not config.platform
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    assert config.parameters["intra_op_num_threads"].string_value == "2"
    assert parse(cpu_config(SIG)).parameters["intra_op_num_threads"].string_value == "1"


def test_write_configs(tmp_path):
    folder = tmp_path / "cifar_resnet"
    production, cpu = write_configs(folder, SIG, max_batch_size=32, preferred_batch_sizes=(32,), intra_op_threads=3)
    assert production == folder / CONFIG_FILE and cpu == folder / CPU_CONFIG_FILE
    assert parse(production.read_text()).platform == "onnxruntime_onnx"
    cpu_parsed = parse(cpu.read_text())
    assert cpu_parsed.backend == "python" and cpu_parsed.max_batch_size == 32
    assert cpu_parsed.parameters["intra_op_num_threads"].string_value == "3"
    assert sorted(p.name for p in folder.rglob("*")) == ["config.pbtxt", "configs", "cpu.pbtxt"]  # no temp files left

    write_configs(folder, dataclasses.replace(SIG, feature_dim=7))  # overwrites in place
    assert list(parse(production.read_text()).output[1].dims) == [7]


@pytest.mark.parametrize(
    "sig, kwargs",
    [
        (SIG, dict(preferred_batch_sizes=(16, 128))),
        (SIG, dict(max_batch_size=8)),  # default preferred sizes exceed it
        (SIG, dict(max_batch_size=0, preferred_batch_sizes=())),
        (SIG, dict(preferred_batch_sizes=(0,))),
        (SIG, dict(max_queue_delay_us=-1)),
        (dataclasses.replace(SIG, scores=()), {}),
        (dataclasses.replace(SIG, scores=("energy", "energy")), {}),
        (dataclasses.replace(SIG, scores=("logits",)), {}),
        (dataclasses.replace(SIG, input_dims=(3, 0, 32)), {}),
        (dataclasses.replace(SIG, input_dims=()), {}),
        (dataclasses.replace(SIG, num_classes=0), {}),
        (dataclasses.replace(SIG, feature_dim=-1), {}),
        (dataclasses.replace(SIG, name=""), {}),
    ],
)
def test_bad_arguments_raise(sig, kwargs):
    with pytest.raises(ValueError):
        production_config(sig, **kwargs)
    with pytest.raises(ValueError):
        cpu_config(sig, **kwargs)


def test_bad_cpu_and_write_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="intra_op_threads"):
        cpu_config(SIG, intra_op_threads=0)
    with pytest.raises(ValueError, match="folder"):
        write_configs(tmp_path / "other_name", SIG)
    with pytest.raises(ValueError):
        write_configs(tmp_path / "cifar_resnet", SIG, max_batch_size=8)
    assert not (tmp_path / "cifar_resnet" / CONFIG_FILE).exists()  # nothing written when the arguments are bad


def add_version(folder, version: int, scores: tuple[str, ...], outputs: tuple[str, ...] | None = None) -> None:
    """A version folder holding only the calibration.json that lists its outputs (all the config writer reads)."""
    sample = np.array([0.0, 1.0])
    thresholds = {s: ScoreThreshold(s, 1.0, 0.95, 2, 2, 1.0, (0.2, 1.0), sample) for s in scores}
    model = {"class_names": ["a", "b"], "input": {"name": "input", "shape": [3, 32, 32]}, "preprocessing": {},
             "scores": list(scores), "outputs": list(outputs or ("logits", "features", *scores))}
    (folder / str(version)).mkdir(parents=True)
    Calibration(model=model, thresholds=thresholds, data={}).save(folder / str(version) / CALIBRATION_FILE)


def declared(path) -> list[str]:
    return [t.name for t in parse(path.read_text()).output]


def test_configs_declare_the_outputs_common_to_the_served_versions(tmp_path):
    """v1 (an older export) lacks sisom, v2 has it and knn: both configs declare the common scores, in the
    newest version's order; once v1 leaves the served window (v3), the config follows the served versions."""
    folder = tmp_path / "cifar_resnet"
    add_version(folder, 1, ("msp", "energy"))
    add_version(folder, 2, ("sisom", "energy", "knn", "msp"))
    sig = dataclasses.replace(SIG, scores=("sisom", "energy", "knn", "msp"))
    production, cpu = write_configs(folder, sig)
    assert declared(production) == declared(cpu) == ["logits", "features", "energy", "msp"]
    config = parse(production.read_text())
    assert all(list(t.dims) == [1] and t.HasField("reshape") for t in config.output[2:])

    add_version(folder, 3, ("sisom", "energy", "knn", "msp"))
    write_configs(folder, sig)
    assert declared(production) == declared(cpu) == ["logits", "features", "sisom", "energy", "knn", "msp"]


def test_a_single_version_gets_its_own_outputs(tmp_path):
    folder = tmp_path / "cifar_resnet"
    add_version(folder, 1, SIG.scores)
    production, cpu = write_configs(folder, SIG)
    assert declared(production) == declared(cpu) == ["logits", "features", *SIG.scores]
    check_common(parse(production.read_text()))


def test_served_versions_that_cannot_share_a_config_are_an_error_naming_them(tmp_path):
    folder = tmp_path / "cifar_resnet"
    add_version(folder, 1, ("knn",))
    add_version(folder, 2, SIG.scores)
    with pytest.raises(ValueError, match=r"versions \[1, 2\] have no score in common.*version 1: \['knn'\]"):
        write_configs(folder, SIG)
    assert not (folder / CONFIG_FILE).exists()

    other = tmp_path / "other" / "cifar_resnet"
    add_version(other, 1, SIG.scores, outputs=("logits", *SIG.scores))
    add_version(other, 2, SIG.scores)
    with pytest.raises(ValueError, match=r"version 1 has no output\(s\) \['features'\].*versions \[1, 2\]"):
        write_configs(other, SIG)

    broken = tmp_path / "broken" / "cifar_resnet"
    add_version(broken, 1, SIG.scores)
    (broken / "1" / CALIBRATION_FILE).write_text("{")
    with pytest.raises(ValueError, match="version 1: .*not valid JSON"):
        write_configs(broken, SIG)
