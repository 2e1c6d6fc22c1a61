import subprocess
import sys

import pytest

from oodguard.cli import main
from oodguard.label_ranges import parse_labels


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
    assert parse_labels("0-3,7") == [0, 1, 2, 3, 7]


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
    from oodguard.export.spec import MULTI_LAYER_BANK_SIZE, ExportSpec

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


def every_parser():
    """(command words, parser) of `oodguard` and each of its subcommands, nested ones included, and of
    `oodguard triton` (a parser of its own, see oodguard.triton_local)."""
    import argparse

    from oodguard.cli import build_parser
    from oodguard.triton_local import build_parser as triton_parser

    def walk(parser, words):
        yield words, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if words == ["oodguard"] and name == "triton":
                        continue  # a placeholder for `oodguard --help`: main() hands triton to its own parser
                    yield from walk(sub, words + [name])

    yield from walk(build_parser(), ["oodguard"])
    yield ["oodguard", "triton"], triton_parser()


def test_every_parser_refuses_abbreviations_and_every_default_is_in_the_help():
    """An abbreviated flag is a guess (`--epoch` read as `--epochs`); a default not in the help is a surprise.
    Every option with a default other than None / False names it in its help."""
    import argparse

    commands = {" ".join(words) for words, _ in every_parser()}
    assert {"oodguard train", "oodguard export", "oodguard evaluate", "oodguard serve", "oodguard predict",
            "oodguard loadgen", "oodguard harvest", "oodguard labels import", "oodguard labels push",
            "oodguard labels pull", "oodguard queue list", "oodguard queue sheet", "oodguard triton"} <= commands
    checked = 0
    for words, parser in every_parser():
        assert parser.allow_abbrev is False, words
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or action.dest == "help" or default is None or default is False
                    or default == argparse.SUPPRESS):
                continue
            assert action.help and "default" in action.help, (words, action.option_strings, default, action.help)
            checked += 1
    assert checked >= 60  # the walk reached the options (train alone has 9 with a default)


@pytest.mark.parametrize("argv, usage, unknown, hint", [
    (["train", "--epoch", "3", "--out", "OUT"], "usage: oodguard train ", "--epoch 3", "did you mean --epochs?"),
    (["export", "--repository", "r", "--max-batch", "8"], "usage: oodguard export ", "--max-batch 8",
     "did you mean --max-batch-size?"),
    (["queue", "list", "--queue", "sqlite:///q", "--limt", "3"], "usage: oodguard queue list ", "--limt 3",
     "did you mean --limit?"),
    (["labels", "pull", "--label-studio", "u", "--project", "1", "--out", "o", "--bogus"],
     "usage: oodguard labels pull ", "--bogus", None),
])
def test_an_unknown_or_abbreviated_flag_is_refused_with_the_subcommands_usage(argv, usage, unknown, hint, capsys,
                                                                             tmp_path):
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as caught:
        main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert err.startswith(usage)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"error: unrecognized arguments: {unknown}" in errors[0]
    assert (hint in errors[0]) if hint else "did you mean" not in errors[0]
    assert not (tmp_path / "OUT").exists()


def test_an_abbreviated_flag_is_refused_by_the_command_line_too(tmp_path):
    out = run("train", "--data", "digits", "--epoch", "3", "--out", str(tmp_path / "w"))
    assert out.returncode == 2 and out.stderr.startswith("usage: oodguard train ")
    assert out.stderr.splitlines()[-1] == ("oodguard train: error: unrecognized arguments: --epoch 3 "
                                           "(--epoch: did you mean --epochs?)")
    assert not (tmp_path / "w").exists()


def test_triton_refuses_an_abbreviated_flag(capsys):
    from oodguard.triton_local import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["--repository", "r", "--grpc", "9001"])
    assert caught.value.code == 2 and "unrecognized arguments: --grpc 9001" in capsys.readouterr().err


def test_harvest_help_lists_every_registered_strategy(capsys, monkeypatch):
    from oodguard.cli import build_parser
    from oodguard.harvest.strategies import STRATEGIES

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens ("sisom-" / "diverse") otherwise
    with pytest.raises(SystemExit) as caught:
        main(["harvest", "--help"])
    lines = capsys.readouterr().out.splitlines()
    strategy_help = next(line for line in lines if line.strip().startswith("--strategy NAME"))
    assert caught.value.code == 0 and "open-quota" in STRATEGIES
    listed = strategy_help.split("one of: ")[1].split(" (")[0].split(", ")
    assert listed == list(STRATEGIES)
    common = ["harvest", "--queue", "q", "--budget", "1", "--out", "o", "--strategy"]
    assert [build_parser().parse_args(common + [name]).strategy for name in STRATEGIES] == list(STRATEGIES)
    assert main(common + ["open_quota"]) == 2  # refused by the registry before the queue is opened
    assert capsys.readouterr().err == (f"oodguard harvest: error: unknown strategy 'open_quota'; choose one of: "
                                       f"{', '.join(STRATEGIES)}\n")


def test_building_the_parser_imports_no_numpy():
    """The strategy names are read from the registry (which imports numpy) only for `harvest`: `serve` and
    `queue` do not pay for it to build the parser."""
    code = ("import sys; from oodguard.cli import build_parser; build_parser(); "
            "assert 'numpy' not in sys.modules, 'numpy imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_ctrl_c_in_train_is_one_line_and_writes_nothing(tmp_path):
    """SIGINT once the first epoch is done (its line printed): exit 130 (128 + SIGINT), one line on stderr, no
    traceback, and no output folder (train writes checkpoint.pt and training.json only after the last epoch)."""
    import os
    import signal

    out_dir = tmp_path / "run"
    with open(tmp_path / "stderr", "w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "oodguard.cli", "train", "--data", "digits", "--epochs",
                                    "50", "--out", str(out_dir)], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   # as from a terminal, even when this run was started with SIGINT ignored (nohup)
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            lines = []
            for line in process.stdout:  # wait for the first epoch's line, whatever it takes
                lines.append(line)
                if line.startswith("epoch 1/50"):
                    break
            assert lines and lines[-1].startswith("epoch 1/50"), "".join(lines) + open(stderr.name).read()
            process.send_signal(signal.SIGINT)
            rest = process.stdout.read()
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
        stderr.seek(0)
        err = stderr.read()
    assert "epoch 50/50" not in rest  # it stopped early
    assert code == 130
    assert "Traceback" not in err
    assert err.splitlines() == [f"oodguard train: interrupted; nothing was written ({out_dir} was not created)"]
    assert not out_dir.exists()


def test_ctrl_c_in_export_says_whether_the_repository_changed(tmp_path, capsys, monkeypatch):
    """The interrupt message of export compares the repository with what it was when the command began:
    unchanged (the pipeline builds a version in a staging folder it removes on any exception), or the paths
    that are new or changed, which may be partial."""
    import oodguard.cli as cli

    repository = tmp_path / "repo"
    (repository / "m" / "1").mkdir(parents=True)
    (repository / "m" / "config.pbtxt").write_text("old")
    argv = ["export", "--repository", str(repository), "--checkpoint", "c.pt", "--model", "m"]

    def staged_then_interrupted(args):
        staging = repository / "m" / ".staging-x"
        staging.mkdir()
        (staging / "model.onnx").write_bytes(b"half")
        staging.joinpath("model.onnx").unlink()
        staging.rmdir()
        raise KeyboardInterrupt

    def interrupted_while_writing(args):
        (repository / "m" / "2").mkdir()
        (repository / "m" / "2" / "model.onnx").write_bytes(b"half")
        (repository / "m" / "config.pbtxt").write_text("new text")
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "export", staged_then_interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err == f"oodguard export: interrupted; nothing was written ({repository} is unchanged)\n"
    monkeypatch.setitem(cli.COMMANDS, "export", interrupted_while_writing)
    assert main(argv) == 130
    assert capsys.readouterr().err == (
        f"oodguard export: interrupted while writing its output, which may be partial; new: {repository}/m/2, "
        f"{repository}/m/2/model.onnx; changed: {repository}/m/config.pbtxt\n")
    monkeypatch.setitem(cli.COMMANDS, "evaluate", staged_then_interrupted)
    code = main(["evaluate", "--repository", str(repository), "--model", "m", "--id", "digits"])
    assert code == 130 and capsys.readouterr().err == "oodguard evaluate: interrupted\n"
