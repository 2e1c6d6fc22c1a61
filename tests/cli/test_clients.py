"""``oodguard predict IMAGE...`` against a real gateway on the digits demo model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from oodguard.cli import main
from serve.conftest import digits_test_images, free_port, repo_copy, start_gateway  # noqa: F401  (fixtures)


@pytest.fixture
def images(digits_test_images, repo_copy, tmp_path):
    """A test digit the served model accepts (5% of held-out digits are flagged by design), and noise."""
    from oodguard.evaluation import VersionScorer

    scorer = VersionScorer(repo_copy / "digits" / "1")
    outputs = scorer.model.run(scorer.preprocessing.apply(digits_test_images[0][:20]))
    first = int(np.flatnonzero(outputs["fused"] <= scorer.calibration.thresholds["fused"].threshold)[0])
    digit = tmp_path / "digit.png"
    Image.fromarray(digits_test_images[0][first]).save(digit)
    noise = tmp_path / "noise.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(noise)
    return digit, noise, int(digits_test_images[1][first])


def test_predict_prints_class_decision_and_scores(start_gateway, repo_copy, images, capsys):
    gateway = start_gateway(repo_copy)
    digit, noise, label = images
    assert main(["predict", str(digit), str(noise), "--target", gateway.target]) == 0
    out = capsys.readouterr().out
    first, second = out.split(f"{noise}:")
    assert f"{digit}: class {label} " in first and "in-distribution" in first and "decided by any(fused=" in first
    assert "<=" in first.split("decided by")[1].splitlines()[0] and "driven by " in first
    assert "OOD" in second and "fused=" in second and " > " in second and "queued as" in second


def test_predict_json(start_gateway, repo_copy, images, capsys):
    gateway = start_gateway(repo_copy)
    digit, noise, label = images
    assert main(["predict", str(digit), str(noise), "--target", gateway.target, "--json", "--top-k", "2",
                 "--model", "digits"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [str(digit), str(noise)]
    a, b = rows[0]["prediction"], rows[1]["prediction"]
    assert a["class_index"] == label and not a["decision"]["ood"] and len(a["top_k"]) == 2
    assert b["decision"]["ood"] and "fused" in b["decision"]["crossed"] and b["record_id"]
    assert b["scores"]["fused"] > b["decision"]["thresholds"]["fused"] and a["model"] == "digits"
    assert b["decision"]["driver"] in b["scores"] and b["decision"]["reasons"] == ["threshold"]


def test_predict_errors(start_gateway, repo_copy, images, tmp_path, capsys):
    gateway = start_gateway(repo_copy)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(images[0]), str(bad), str(tmp_path / "missing.png"), "--target", gateway.target]) == 1
    out = capsys.readouterr().out
    assert "class" in out and f"{bad}: error INVALID_ARGUMENT" in out and "missing.png: error NOT_FOUND" in out
    assert main(["predict", str(images[0]), "--target", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 2
    assert "cannot reach the gateway" in capsys.readouterr().err
    assert main(["predict", str(images[0]), "--target", gateway.target, "--model", "nope"]) == 1


def test_predict_json_into_a_closed_pipe_ends_quietly(start_gateway, repo_copy, images):
    """`oodguard predict --json ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    import sys

    gateway = start_gateway(repo_copy)
    digit = str(images[0])
    command = f"{sys.executable} -m oodguard.cli predict {' '.join([digit] * 150)} --target {gateway.target} --json | head -1"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "["
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
