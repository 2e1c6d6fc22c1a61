import subprocess
import sys

import pytest

from oodguard.cli import _classes, main


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "oodguard.cli", *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("command", ["train", "export", "validate-repo"])
def test_every_subcommand_explains_itself(command):
    out = run(command, "--help")
    assert out.returncode == 0 and "usage: oodguard " + command in out.stdout


@pytest.mark.parametrize("command, expected", [
    ("train", ["--epochs EPOCHS   training epochs (default 10)", "(default 128)", "(default 0.001)", "(default 0)",
               "--shift PIXELS", "(default 0: off)", "--outlier-data SPEC", "whose output the saved model drops",
               "(default: none)"]),
    ("export", ["95%-TPR thresholds", "(default 64)", "halves (default 0)", "--validation-ood SPEC",
                "--fused-components", "--multi-layer", "Default off", "no backward pass", "Cost:",
                "--multi-layer-bank-size N", "(default 5000)"]),
    ("evaluate", ["model repository folder (required)", "(default 0)"]),
])
def test_help_texts_show_their_defaults(command, expected):
    out = " ".join(run(command, "--help").stdout.split())  # argparse wraps lines
    for text in expected:
        assert " ".join(text.split()) in out, text
    assert "%%" not in out


def test_class_ranges():
    assert _classes("0-3,7") == [0, 1, 2, 3, 7]


def test_train_then_export_a_user_checkpoint(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--classes", "0-2", "--epochs", "2", "--out", str(tmp_path / "w")]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    assert (tmp_path / "w" / "checkpoint.pt").exists() and (tmp_path / "w" / "training.json").exists()
    code = main(["export", "--checkpoint", str(tmp_path / "w" / "checkpoint.pt"), "--model", "three",
                 "--repository", str(tmp_path / "repo"), "--bank-size", "60", "--alpha", "1"])
    assert code == 0
    assert (tmp_path / "repo" / "three" / "1" / "model.onnx").exists()
    assert main(["validate-repo", str(tmp_path / "repo")]) == 0
    assert "1 models, 1 versions checked: OK" in capsys.readouterr().out


def test_train_with_outlier_data_records_it_and_saves_the_classes_only(tmp_path, capsys):
    import json

    import numpy as np
    import torch

    from oodguard.datasets import load_dataset

    digits = load_dataset("digits")
    np.savez(tmp_path / "out.npz", images=digits.images[digits.labels == 9][:40])
    assert main(["train", "--data", "digits", "--classes", "0-2", "--epochs", "2", "--out", str(tmp_path / "w"),
                 "--outlier-data", str(tmp_path / "out.npz")]) == 0
    assert "40 outlier images" in capsys.readouterr().out
    record = json.loads((tmp_path / "w" / "training.json").read_text())
    assert record["outliers"] == [str(tmp_path / "out.npz")] and record["outlier_images"] == 40
    assert torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)["head.weight"].shape[0] == 3


def test_multi_layer_bank_default_is_the_export_default():
    from oodguard.cli import build_parser
    from oodguard.export.pipeline import MULTI_LAYER_BANK_SIZE, ExportSpec

    args = build_parser().parse_args(["export", "--repository", "r", "--checkpoint", "c.pt", "--model", "m"])
    assert args.multi_layer is False and args.multi_layer_bank_size == MULTI_LAYER_BANK_SIZE
    assert ExportSpec.__dataclass_fields__["multi_layer"].default is False


def test_export_multi_layer_flag_on_and_off(tmp_path):
    """Without --multi-layer the version has no multi-layer outputs and says so in calibration.json; with it,
    both scores are outputs of the graph and scored by calibration."""
    import json

    import onnx

    assert main(["train", "--data", "digits", "--classes", "0-2", "--epochs", "2", "--out", str(tmp_path / "w")]) == 0
    common = ["export", "--checkpoint", str(tmp_path / "w" / "checkpoint.pt"), "--repository", str(tmp_path / "repo"),
              "--bank-size", "90", "--alpha", "1", "--knn-k", "2"]
    assert main([*common, "--model", "plain"]) == 0
    assert main([*common, "--model", "layered", "--multi-layer", "--multi-layer-bank-size", "60"]) == 0
    for name, multi in (("plain", False), ("layered", True)):
        folder = tmp_path / "repo" / name / "1"
        model = json.loads((folder / "calibration.json").read_text())["model"]
        outputs = [o.name for o in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.output]
        assert model["multi_layer"] is multi
        assert ({"sisom_ml", "sisome_ml"} <= set(outputs)) is multi and ("sisom_ml" in model["scores"]) is multi
        assert outputs == model["outputs"]
    assert model["multi_layer_bank"]["size"] == 60 and model["score_params"]["sisom_ml"]["bank_size"] == 60
    assert main(["validate-repo", str(tmp_path / "repo")]) == 0


def test_export_without_training_record_names_the_missing_flags(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    out = run("export", "--checkpoint", str(tmp_path / "ckpt.pt"), "--model", "m", "--repository", str(tmp_path))
    assert out.returncode == 2
    assert "--backbone, --bank-data, --calibration-data, --class-names" in out.stderr
    assert "Traceback" not in out.stderr


def test_export_of_a_broken_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    out = run("export", "--checkpoint", str(tmp_path / "ckpt.pt"), "--model", "m", "--repository", str(tmp_path / "r"),
              "--backbone", "lenet5", "--bank-data", "digits", "--calibration-data", "digits", "--class-names", "a,b")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "oodguard export: error:" in out.stderr and "ckpt.pt" in out.stderr


def test_validate_repo_fails_on_a_broken_config(digits_export, tmp_path):
    import shutil

    _, _, repository, _ = digits_export
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy)
    config = copy / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "logits"', 'name: "logit"'))
    out = run("validate-repo", str(copy))
    assert out.returncode == 1
    assert "logit" in out.stdout and "problem" in out.stdout


def test_harvest_lists_a_strategys_parameters_and_refuses_a_typo_before_touching_the_queue(tmp_path):
    common = ["harvest", "--queue", f"sqlite:///{tmp_path / 'q.sqlite'}", "--strategy", "aloe", "--budget", "5",
              "--out", str(tmp_path / "out")]
    listed = run(*common, "--param", "help")
    assert listed.returncode == 0 and "aloe parameters (--param KEY=VALUE): score (pool score" in listed.stdout
    typo = run(*common, "--param", "tprr=0.9")
    assert typo.returncode == 2 and "has no parameter(s) ['tprr']; its parameters: score" in typo.stderr
    assert not (tmp_path / "q.sqlite").exists() and not (tmp_path / "out").exists()
