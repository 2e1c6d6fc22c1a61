"""validate_repository on a tiny fused-head repository built without torch, then broken one way at a time."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from oodguard.calibration import Calibration, ScoreThreshold
from oodguard.export.triton_config import ModelSignature, write_configs
from oodguard.repository import CALIBRATION_FILE, CONFIG_FILE, CPU_CONFIG_FILE, MODEL_FILE
from oodguard.validate_repo import report, validate_repository

NAME = "tiny"
SCORES = ("energy", "msp", "maxlogit")
CLASSES = ["cat", "dog", "eel"]
SIG = ModelSignature(name=NAME, input_dims=(1, 4, 4), num_classes=3, feature_dim=16, scores=SCORES)
#: Reduction (over the class axis of the logits) standing in for each score.
SCORE_OPS = {"energy": "ReduceLogSumExp", "msp": "ReduceMax", "maxlogit": "ReduceSum", "knn": "ReduceMin"}


def tiny_model(path: Path, scores: tuple[str, ...] = SCORES, batch: str | int = "N") -> None:
    """input [N,1,4,4] -> features = flatten [N,16] -> logits = features @ W [N,3] -> one [N] reduction per score."""
    weights = numpy_helper.from_array(np.linspace(-1, 1, 16 * 3, dtype=np.float32).reshape(16, 3), "W")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Flatten", ["input"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "W"], ["logits"]),
        *(helper.make_node(SCORE_OPS[s], ["logits", "axes"], [s], keepdims=0) for s in scores),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_fused_head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 4, 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 16]),
            *(helper.make_tensor_value_info(s, TensorProto.FLOAT, [batch]) for s in scores),
        ],
        initializer=[weights, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def tiny_calibration(
    path: Path, scores: tuple[str, ...] = SCORES, class_names: list[str] = CLASSES, input_shape=(1, 4, 4)
) -> None:
    sample = np.array([0.0, 0.5, 1.0, 2.0])
    thresholds = {
        name: ScoreThreshold(
            name=name, threshold=1.0, target_tpr=0.95, n=len(sample), accepted=3,
            achieved_tpr=0.75, achieved_tpr_ci95=(0.3, 0.95), sorted_scores=sample,
        )
        for name in scores
    }
    model = {
        "class_names": class_names,
        "input": {"name": "input", "shape": list(input_shape), "dtype": "float32"},
        "preprocessing": {"mean": [0.5], "std": [0.25]},
        "scores": list(scores),
    }
    Calibration(model=model, thresholds=thresholds, data={"source": "test", "n": len(sample)}).save(path)


def build_model(repository: Path, name: str = NAME, n_versions: int = 2) -> Path:
    folder = repository / name
    write_configs(folder, dataclasses.replace(SIG, name=name), max_batch_size=8, preferred_batch_sizes=(4, 8))
    for version in range(1, n_versions + 1):
        (folder / str(version)).mkdir()
        tiny_model(folder / str(version) / MODEL_FILE)
        tiny_calibration(folder / str(version) / CALIBRATION_FILE)
    return folder


@pytest.fixture
def repo(tmp_path) -> Path:
    repository = tmp_path / "model_repository"
    repository.mkdir()
    build_model(repository)
    return repository


def edit_config(path: Path, change: Callable[[mc.ModelConfig], None]) -> None:
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    change(config)
    path.write_text(text_format.MessageToString(config))


def output(config: mc.ModelConfig, name: str) -> mc.ModelOutput:
    return next(t for t in config.output if t.name == name)


Breaker = Callable[[Path], object]  # breaks the model folder it is given


def in_config(change: Callable[[mc.ModelConfig], None], file: str = CONFIG_FILE) -> Breaker:
    return lambda folder: edit_config(folder / file, change)


def set_fields(message, **fields) -> None:
    for name, value in fields.items():
        setattr(message, name, value)


def append_text(file: str, text: str) -> Breaker:
    return lambda folder: (folder / file).write_text((folder / file).read_text() + text)


def version_file(name: str) -> Path:
    return Path("1") / name


def test_good_repository(repo):
    assert validate_repository(repo) == []
    out = io.StringIO()
    assert report(repo, out) == 0
    assert out.getvalue() == "1 models, 2 versions checked: OK\n"


# (how to break the model folder, the path the problem names ends with, fragments of its message)
BREAKAGES: dict[str, tuple[Breaker, str, list[str]]] = {
    "syntax error": (
        lambda m: (m / CONFIG_FILE).write_text('name: "tiny"\nmax_batch_size: 8 {\n'),
        CONFIG_FILE, ["cannot parse", "2:"],
    ),
    "unknown field": (append_text(CONFIG_FILE, "gpu_memory: 4\n"), CONFIG_FILE, ["cannot parse", "gpu_memory"]),
    "unknown field in cpu config": (
        append_text(CPU_CONFIG_FILE, "backnd: 'python'\n"), CPU_CONFIG_FILE, ["cannot parse", "backnd"],
    ),
    "wrong output name": (
        in_config(lambda c: set_fields(output(c, "msp"), name="mps")),
        MODEL_FILE, ["config.pbtxt", "output 'mps'", "not in the model"],
    ),
    "model input not in config": (
        in_config(lambda c: c.input.pop()), MODEL_FILE, ["model input 'input' is not declared"],
    ),
    "wrong logits dims": (
        in_config(lambda c: output(c, "logits").dims.__setitem__(0, 4)),
        MODEL_FILE, ["output 'logits'", "[N, 3]", "[batch, 4]"],
    ),
    "missing reshape": (
        in_config(lambda c: output(c, "energy").ClearField("reshape")),
        MODEL_FILE, ["output 'energy'", "[N]", "[batch, 1]", "reshape"],
    ),
    "reshape on logits": (
        in_config(lambda c: output(c, "logits").reshape.SetInParent(), CPU_CONFIG_FILE),
        MODEL_FILE, ["configs/cpu.pbtxt", "output 'logits'", "reshape.shape"],
    ),
    "wrong dtype": (
        in_config(lambda c: set_fields(output(c, "logits"), data_type=mc.TYPE_FP16)),
        MODEL_FILE, ["output 'logits'", "TYPE_FP16", "tensor(float)"],
    ),
    "wrong input dtype": (
        in_config(lambda c: set_fields(c.input[0], data_type=mc.TYPE_UINT8)),
        MODEL_FILE, ["input 'input'", "TYPE_UINT8"],
    ),
    "name mismatch": (in_config(lambda c: set_fields(c, name="other")), CONFIG_FILE, ["'other'", "'tiny'"]),
    "no dynamic batch": (in_config(lambda c: set_fields(c, max_batch_size=0)), CONFIG_FILE, ["max_batch_size"]),
    "fixed batch dim": (
        lambda m: tiny_model(m / version_file(MODEL_FILE), batch=1), MODEL_FILE, ["fixed batch dimension 1"],
    ),
    "missing model.onnx": (lambda m: (m / version_file(MODEL_FILE)).unlink(), "1", ["missing model.onnx"]),
    "corrupt model.onnx": (
        lambda m: (m / version_file(MODEL_FILE)).write_bytes(b"not a model"),
        MODEL_FILE, ["ONNX Runtime cannot load"],
    ),
    "missing calibration": (
        lambda m: (m / version_file(CALIBRATION_FILE)).unlink(), "1", ["missing calibration.json"],
    ),
    "invalid calibration": (
        lambda m: (m / version_file(CALIBRATION_FILE)).write_text("{"), CALIBRATION_FILE, ["not valid JSON"],
    ),
    "calibration score not in the model": (
        lambda m: tiny_calibration(m / version_file(CALIBRATION_FILE), scores=(*SCORES, "knn")),
        CALIBRATION_FILE, ["calibration score 'knn'", "not an output of model.onnx"],
    ),
    "config score without threshold": (
        lambda m: tiny_calibration(m / version_file(CALIBRATION_FILE), scores=("energy",)),
        CALIBRATION_FILE, ["config output 'msp'", "version 1", "no threshold"],
    ),
    "calibration input shape": (
        lambda m: tiny_calibration(m / version_file(CALIBRATION_FILE), input_shape=(3, 4, 4)),
        CALIBRATION_FILE, ["input shape [3, 4, 4]", "[1, 4, 4]"],
    ),
    "class names": (
        lambda m: tiny_calibration(m / version_file(CALIBRATION_FILE), class_names=["cat", "dog"]),
        CALIBRATION_FILE, ["2 class names", "'logits'"],
    ),
    "no version": (lambda m: [shutil.rmtree(m / v) for v in ("1", "2")], NAME, ["no version folder"]),
    "missing config.pbtxt": (lambda m: (m / CONFIG_FILE).unlink(), NAME, ["missing config.pbtxt"]),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_breakage_is_caught(repo, breakage):
    break_it, path_suffix, fragments = BREAKAGES[breakage]
    break_it(repo / NAME)
    problems = validate_repository(repo)
    assert any(
        p.path.endswith(path_suffix) and all(f in p.message for f in fragments) for p in problems
    ), f"no problem at *{path_suffix} with {fragments} in {problems}"


def add_version(folder: Path, version: int, scores: tuple[str, ...]) -> None:
    (folder / str(version)).mkdir(parents=True)
    tiny_model(folder / str(version) / MODEL_FILE, scores=scores)
    tiny_calibration(folder / str(version) / CALIBRATION_FILE, scores=scores)


def declared_scores(path: Path) -> list[str]:
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    return [t.name for t in config.output][2:]


def test_versions_of_different_score_sets_validate(tmp_path):
    """v1 lacks maxlogit (an older export), v2 has it: the configs written after v2 declare the common scores,
    and both served versions validate; v2's undeclared maxlogit is no problem."""
    folder = tmp_path / NAME
    add_version(folder, 1, ("energy", "msp"))
    add_version(folder, 2, SCORES)
    write_configs(folder, SIG, max_batch_size=8, preferred_batch_sizes=(4, 8))
    assert declared_scores(folder / CONFIG_FILE) == declared_scores(folder / CPU_CONFIG_FILE) == ["energy", "msp"]
    assert validate_repository(tmp_path) == []


def test_config_output_a_served_version_lacks_is_reported(tmp_path):
    folder = tmp_path / NAME
    add_version(folder, 1, ("energy", "msp"))
    add_version(folder, 2, SCORES)
    write_configs(folder, SIG, max_batch_size=8, preferred_batch_sizes=(4, 8))

    def declare_maxlogit(config: mc.ModelConfig) -> None:
        config.output.add(name="maxlogit", data_type=mc.TYPE_FP32, dims=[1]).reshape.SetInParent()

    edit_config(folder / CONFIG_FILE, declare_maxlogit)  # as a config written for version 2 alone would
    found = [(Path(p.path).relative_to(tmp_path).as_posix(), p.message) for p in validate_repository(tmp_path)]
    assert found == [
        ("tiny/1/model.onnx", "config.pbtxt: output 'maxlogit' is in the config but not in the model"),
        ("tiny/1/calibration.json",
         "config.pbtxt: config output 'maxlogit' is not a score of version 1: no threshold in its calibration.json"),
    ]


def test_a_version_no_config_serves_is_not_checked_against_the_configs(tmp_path):
    """Three versions, the newest two served: version 1 lacking maxlogit is out of the window, so the configs
    written after version 3 declare maxlogit again, and the repository validates."""
    folder = tmp_path / NAME
    add_version(folder, 1, ("energy", "msp"))
    add_version(folder, 2, SCORES)
    add_version(folder, 3, SCORES)
    write_configs(folder, SIG, max_batch_size=8, preferred_batch_sizes=(4, 8))
    assert declared_scores(folder / CONFIG_FILE) == list(SCORES)
    assert validate_repository(tmp_path) == []
    tiny_calibration(folder / "1" / CALIBRATION_FILE, scores=("energy", "knn"))  # its own problems still count
    assert [p.message for p in validate_repository(tmp_path)] == ["calibration score 'knn' is not an output of model.onnx"]


def test_all_problems_are_reported(repo):
    """Breakages in two configs, two versions and two models: none hides another."""
    build_model(repo, "second", n_versions=1)
    (repo / NAME / CONFIG_FILE).write_text("name: [")
    edit_config(repo / NAME / CPU_CONFIG_FILE, lambda c: set_fields(c, name="renamed"))
    (repo / NAME / "1" / MODEL_FILE).unlink()
    (repo / NAME / "2" / CALIBRATION_FILE).write_text("[]")
    edit_config(repo / "second" / CONFIG_FILE, lambda c: output(c, "features").dims.__setitem__(0, 8))

    found = [(Path(p.path).relative_to(repo).as_posix(), p.message) for p in validate_repository(repo)]

    def reported(path: str, fragment: str) -> bool:
        return any(where == path and fragment in message for where, message in found)

    assert reported("tiny/config.pbtxt", "cannot parse")
    assert reported("tiny/configs/cpu.pbtxt", "'renamed'")
    assert reported("tiny/1", "missing model.onnx")
    assert reported("tiny/2/calibration.json", "not an oodguard calibration")
    assert not reported("tiny/2/model.onnx", "")  # version 2's model matches the config that parsed
    assert reported("second/1/model.onnx", "config.pbtxt: output 'features'")
    assert not reported("second/1/model.onnx", "configs/cpu.pbtxt")
    assert len(found) == 5, found


def test_report_prints_problems(repo):
    (repo / NAME / "2" / CALIBRATION_FILE).unlink()
    edit_config(repo / NAME / CONFIG_FILE, lambda c: set_fields(c, name="other"))
    out = io.StringIO()
    assert report(repo, out) == 1
    lines = out.getvalue().splitlines()
    problems = validate_repository(repo)
    assert len(problems) == 2
    assert lines[:-1] == [f"{p.path}: {p.message}" for p in problems]
    assert f"{repo / NAME / '2'}: missing calibration.json" in lines
    assert lines[-1] == "1 models, 2 versions checked: 2 problems"


def test_report_to_stdout(repo, capsys):
    assert report(repo) == 0
    assert capsys.readouterr().out.endswith("checked: OK\n")


def test_missing_repository(tmp_path):
    missing = tmp_path / "nowhere"
    [problem] = validate_repository(missing)
    assert problem.path == str(missing) and "does not exist" in problem.message
    out = io.StringIO()
    assert report(missing, out) == 1
    first, summary = out.getvalue().splitlines()
    assert first.startswith(f"{missing}: ") and "does not exist" in first
    assert summary == "0 models, 0 versions checked: 1 problem"


def test_empty_repository(tmp_path):
    problems = validate_repository(tmp_path)
    assert len(problems) == 1 and "no model folders" in problems[0].message


def test_versions_of_different_class_counts_validate(digits_two_versions):
    repository, _, _ = digits_two_versions  # v1: 8 classes, v2: 9 (a retrain that added one)
    assert validate_repository(repository) == []
