"""Check a model repository before Triton or the gateway sees it: configs, ONNX models, calibrations.

Every model folder, every config (``config.pbtxt`` and ``configs/*.pbtxt``) and every version is
checked, and every problem found is reported, not just the first. Serving side: ONNX models are
read with ONNX Runtime, configs with tritonclient's ``ModelConfig`` proto; neither torch nor onnx
is imported.

Versions against configs: each version a config serves (its ``version_policy``; Triton's default is the
newest one) is checked against that config. An output the config declares that the version lacks (in its
``model.onnx`` or, for a score, its ``calibration.json``) is an error naming version and output: Triton would
refuse to load that version. A score the version has but the config does not declare is fine: versions of
one model may have different score sets, and the config declares the ones they share (see
:mod:`oodguard.export.triton_config`); the gateway does not score it for that version. A version no config
serves is checked on its own only (model, calibration, class count).

Usage: ``python -m oodguard.validate_repo REPOSITORY`` (exit status 0 when no problem is found).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from oodguard.calibration import Calibration, CalibrationError
from oodguard.repository import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    CPU_CONFIG_FILE,
    INPUT_NAME,
    MODEL_FILE,
    TENSOR_OUTPUTS,
    RepositoryError,
    model_dir,
    models,
    version_dir,
    versions,
)

#: Triton data types and the ONNX Runtime type string of the same element type.
TRITON_TO_ONNX = {
    mc.TYPE_BOOL: "tensor(bool)",
    mc.TYPE_UINT8: "tensor(uint8)",
    mc.TYPE_UINT16: "tensor(uint16)",
    mc.TYPE_UINT32: "tensor(uint32)",
    mc.TYPE_UINT64: "tensor(uint64)",
    mc.TYPE_INT8: "tensor(int8)",
    mc.TYPE_INT16: "tensor(int16)",
    mc.TYPE_INT32: "tensor(int32)",
    mc.TYPE_INT64: "tensor(int64)",
    mc.TYPE_FP16: "tensor(float16)",
    mc.TYPE_FP32: "tensor(float)",
    mc.TYPE_FP64: "tensor(double)",
    mc.TYPE_STRING: "tensor(string)",
    mc.TYPE_BF16: "tensor(bfloat16)",
}

#: Shape of a model tensor as ONNX Runtime reports it: ints for fixed dims, names or None for dynamic ones.
OnnxShape = Sequence[int | str | None]


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the repository, and the file or folder it was found in."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def validate_repository(repository: Path) -> list[Problem]:
    """Every problem found in ``repository``; an empty list means it is ready to serve."""
    root = Path(repository)
    try:
        names = models(root)
    except RepositoryError as exc:
        return [Problem(str(root), str(exc))]
    if not names:
        return [Problem(str(root), "no model folders (a folder holding config.pbtxt or a version folder)")]
    problems: list[Problem] = []
    for name in names:
        problems += _check_model(root, name)
    return problems


def report(repository: Path, out: TextIO | None = None) -> int:
    """Print one ``PATH: message`` line per problem and a summary line to ``out`` (stdout); 0 if none, else 1."""
    out = out or sys.stdout
    problems = validate_repository(repository)
    for problem in problems:
        print(problem, file=out)
    try:
        names = models(repository)
    except RepositoryError:
        names = []
    n_versions = sum(len(versions(repository, name)) for name in names)
    plural = "" if len(problems) == 1 else "s"
    status = f"{len(problems)} problem{plural}" if problems else "OK"
    print(f"{len(names)} models, {n_versions} versions checked: {status}", file=out)
    return 1 if problems else 0


def _check_model(root: Path, name: str) -> list[Problem]:
    folder = model_dir(root, name)
    problems: list[Problem] = []
    configs: dict[str, mc.ModelConfig] = {}
    if not (folder / CONFIG_FILE).is_file():
        problems.append(Problem(str(folder), f"missing {CONFIG_FILE}"))
    config_paths = [folder / CONFIG_FILE, *sorted((folder / Path(CPU_CONFIG_FILE).parent).glob("*.pbtxt"))]
    for path in filter(Path.is_file, config_paths):
        try:
            config = text_format.Parse(path.read_text(), mc.ModelConfig())
        except (text_format.ParseError, OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(path), f"cannot parse: {exc}"))
            continue
        problems += [Problem(str(path), message) for message in _config_problems(config, name)]
        configs[path.relative_to(folder).as_posix()] = config

    version_numbers = versions(root, name)
    if not version_numbers:
        problems.append(Problem(str(folder), "no version folder (1/, 2/, ...)"))
    for version in version_numbers:
        serving = {label: c for label, c in configs.items() if version in served_versions(c, version_numbers)}
        problems += _check_version(version_dir(root, name, version), serving)
    return problems


def served_versions(config: mc.ModelConfig, available: Sequence[int]) -> list[int]:
    """The versions among ``available`` (ascending) that Triton serves under ``config``'s version policy."""
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return list(available)
    if kind == "specific":
        return [v for v in available if v in set(policy.specific.versions)]
    count = policy.latest.num_versions if kind == "latest" else 1  # no policy: Triton serves the newest one
    return list(available[-count:]) if count > 0 else []


def _config_problems(config: mc.ModelConfig, folder_name: str) -> list[str]:
    """Problems of a config on its own: its name, batching, and the tensors every fused-head model has."""
    problems = []
    if config.name and config.name != folder_name:
        problems.append(f"config name {config.name!r} differs from the folder name {folder_name!r}")
    if config.max_batch_size <= 0:
        problems.append(f"max_batch_size is {config.max_batch_size}; dynamic batch requires max_batch_size > 0")
    if INPUT_NAME not in {t.name for t in config.input}:
        problems.append(f"no input {INPUT_NAME!r}")
    outputs = {t.name for t in config.output}
    problems += [f"no output {name!r}" for name in TENSOR_OUTPUTS if name not in outputs]
    return problems


def _check_version(folder: Path, configs: dict[str, mc.ModelConfig]) -> list[Problem]:
    """Problems of one version folder, against each config (that parsed) serving it."""
    problems: list[Problem] = []
    onnx_path, calibration_path = folder / MODEL_FILE, folder / CALIBRATION_FILE

    session = None
    if not onnx_path.is_file():
        problems.append(Problem(str(folder), f"missing {MODEL_FILE}"))
    else:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: warnings would drown the report
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own pybind exception types
            problems.append(Problem(str(onnx_path), f"ONNX Runtime cannot load the model: {exc}"))

    calibration = None
    if not calibration_path.is_file():
        problems.append(Problem(str(folder), f"missing {CALIBRATION_FILE}"))
    else:
        try:
            calibration = Calibration.load(calibration_path)
        except CalibrationError as exc:
            problems.append(Problem(str(calibration_path), str(exc).removeprefix(f"{calibration_path}: ")))

    if session is not None and calibration is not None:
        problems += [Problem(str(calibration_path), m) for m in _class_count_problems(session, calibration)]
        graph_outputs = {o.name for o in session.get_outputs()}
        problems += [Problem(str(calibration_path), f"calibration score {name!r} is not an output of {MODEL_FILE}")
                     for name in calibration.model["scores"] if name not in graph_outputs]
    for label, config in configs.items():
        if session is not None:
            problems += [Problem(str(onnx_path), f"{label}: {m}") for m in _io_problems(config, session)]
        if calibration is not None:
            problems += [
                Problem(str(calibration_path), f"{label}: {m}")
                for m in _calibration_problems(config, calibration, folder.name)
            ]
    return problems


def _class_count_problems(session: ort.InferenceSession, calibration: Calibration) -> list[str]:
    """The version's class names against its ONNX model's logits width (the config's class axis is variable)."""
    logits = TENSOR_OUTPUTS[0]
    shapes = {o.name: o.shape for o in session.get_outputs()}
    width = shapes.get(logits, [None])[-1] if shapes.get(logits) else None
    n_classes = len(calibration.class_names)
    if isinstance(width, int) and width != n_classes:
        return [f"calibration has {n_classes} class names but {MODEL_FILE}'s output {logits!r} has {width}"]
    return []


def _io_problems(config: mc.ModelConfig, session: ort.InferenceSession) -> list[str]:
    """Differences between the config's inputs/outputs and the model's: names, dtypes, shapes. A model output
    the config does not declare is fine (Triton does not serve it); an undeclared model input is not."""
    batched = config.max_batch_size > 0
    problems = []
    for kind, declared, actual in (
        ("input", config.input, session.get_inputs()),
        ("output", config.output, session.get_outputs()),
    ):
        in_model = {arg.name: arg for arg in actual}
        declared_names = {tensor.name for tensor in declared}
        for tensor in declared:
            arg = in_model.get(tensor.name)
            if arg is None:
                problems.append(f"{kind} {tensor.name!r} is in the config but not in the model")
                continue
            expected_type = TRITON_TO_ONNX.get(tensor.data_type)
            if arg.type != expected_type:
                type_name = mc.DataType.Name(tensor.data_type)
                problems.append(f"{kind} {tensor.name!r}: config data_type {type_name} but the model has {arg.type}")
            problems += [f"{kind} {tensor.name!r}: {m}" for m in _shape_problems(tensor, arg.shape, batched)]
        problems += [
            f"model {kind} {arg.name!r} is not declared in the config"
            for arg in actual
            if arg.name not in declared_names and kind == "input"
        ]
    return problems


def _shape_problems(tensor: mc.ModelInput | mc.ModelOutput, shape: OnnxShape, batched: bool) -> list[str]:
    """Compare an ONNX shape with ``[batch] + dims`` (or ``[batch] + reshape.shape`` when a reshape is declared)."""
    has_reshape = tensor.HasField("reshape")
    model_dims = list(tensor.reshape.shape if has_reshape else tensor.dims)
    expected = (["batch"] if batched else []) + model_dims
    problems = []
    if batched and shape and isinstance(shape[0], int):
        problems.append(f"fixed batch dimension {shape[0]} in the model, but max_batch_size > 0 needs a dynamic one")
    item_shape = shape[1:] if batched else shape
    misplaced = [d for d, want in zip(item_shape, model_dims) if not isinstance(d, int) and want != -1]
    if misplaced:
        problems.append(f"dynamic dimension(s) {misplaced} outside the batch position")
    if len(shape) != len(expected) or any(
        isinstance(d, int) and want not in (d, -1) for d, want in zip(item_shape, model_dims)
    ):
        source = "reshape.shape" if has_reshape else "dims"
        message = f"model shape {_format_shape(shape)} does not match the config's {_format_shape(expected)} ({source})"
        if not has_reshape and model_dims == [1] and len(shape) == len(expected) - 1:
            message += "; a [batch] tensor is declared dims: [ 1 ] reshape: { shape: [ ] }"
        problems.append(message)
    return problems


def _calibration_problems(config: mc.ModelConfig, calibration: Calibration, version: str) -> list[str]:
    """Differences between a version's calibration.json and the config: scores the config declares that the
    version lacks (a score of the version's that the config leaves out is fine), input shape, class count."""
    outputs = {tensor.name: tensor for tensor in config.output}
    inputs = {tensor.name: tensor for tensor in config.input}
    problems = [
        f"config output {name!r} is not a score of version {version}: no threshold in its {CALIBRATION_FILE}"
        for name in outputs
        if name not in TENSOR_OUTPUTS and name not in calibration.thresholds
    ]
    if INPUT_NAME in inputs:
        shape = calibration.model["input"].get("shape") if isinstance(calibration.model["input"], dict) else None
        dims = list(inputs[INPUT_NAME].dims)
        if shape != dims:
            problems.append(f"calibration input shape {shape} differs from the config's input dims {dims}")
    logits = TENSOR_OUTPUTS[0]
    if logits in outputs:
        n_classes, dims = len(calibration.class_names), list(outputs[logits].dims)
        if dims not in ([n_classes], [-1]):  # [-1]: a variable class axis, for versions of any class count
            problems.append(f"calibration has {n_classes} class names but output {logits!r} has dims {dims}")
    return problems


def _format_shape(shape: OnnxShape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m oodguard.validate_repo REPOSITORY")
    sys.exit(report(Path(sys.argv[1])))
