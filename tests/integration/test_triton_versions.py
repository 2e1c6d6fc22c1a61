"""A real tritonserver serves two versions of one model with one config, behind the gateway:

* class counts differ (v2 added a class): each version answers with its own logits width and class names;
* score sets differ (v1 is an older export without ``gradnorm`` and ``fused``): the export of v2 declares the
  outputs common to both, both versions answer with the common scores (v2 falls back from ``fused`` to
  ``sisome``); when v1 leaves the served window the config grows back, and when a newer export lacks them
  again it shrinks: the gateway follows both.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway_fixtures import GatewayThread
from oodguard.export.triton_config import ModelSignature, write_configs
from oodguard.repository import CALIBRATION_FILE, CONFIG_FILE, CPU_CONFIG_FILE, MODEL_FILE
from oodguard.triton_local import TritonServer

from oodguard.serve.settings import Settings
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc
from oodguard.validate_repo import validate_repository


def serve_through_triton(triton_install, repository, tmp_path, request):
    """A real tritonserver on ``repository`` and the gateway in front of it (both stopped at the test's end), and
    a request tensor of four 8x8 noise images."""
    triton = TritonServer(triton_install, repository, tmp_path / "tritonserver.log").start()
    request.addfinalizer(triton.stop)
    gateway = GatewayThread(Settings(repository=repository, listen="127.0.0.1:0", backend="triton",
                                     triton_url=triton.url, queue_path=tmp_path / "queue.sqlite", poll_interval_s=0.5))
    request.addfinalizer(lambda: gateway.stop(1.0))
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    return gateway, pb.Tensor(dtype="uint8", shape=[4, 8, 8], data=images.tobytes())


def test_triton_serves_versions_of_different_class_counts(triton_install, digits_two_versions, tmp_path, request):
    source, _, _ = digits_two_versions
    repository = tmp_path / "repository"
    shutil.copytree(source, repository)
    assert validate_repository(repository) == []
    gateway, tensor = serve_through_triton(triton_install, repository, tmp_path, request)
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        info = stub.ModelInfo(pb.ModelInfoRequest(model="digits"), timeout=30)
        versions = {v.version: list(v.class_names) for v in info.models[0].versions}
        assert versions == {1: [str(c) for c in range(8)], 2: [str(c) for c in range(9)]}
        for version, width in ((1, 8), (2, 9)):
            answer = stub.Predict(pb.PredictRequest(tensor=tensor, version=version, top_k=20), timeout=30)
            assert answer.version == version
            assert all(len(p.top_k) == width for p in answer.predictions)
            assert all(p.class_name in versions[version] for p in answer.predictions)
        latest = stub.Predict(pb.PredictRequest(tensor=tensor), timeout=30)
        assert latest.version == 2


#: what an older export lacks: a score added later and the fused decision
OLDER_LACKS = ("gradnorm", "fused")


def strip_scores(folder: Path, names: tuple[str, ...]) -> None:
    """Make a version folder look like an export without ``names``: its graph's outputs and its calibration."""
    model = onnx.load(folder / MODEL_FILE)
    kept = [o for o in model.graph.output if o.name not in names]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, folder / MODEL_FILE)
    raw = json.loads((folder / CALIBRATION_FILE).read_text())
    raw["model"]["scores"] = [s for s in raw["model"]["scores"] if s not in names]
    raw["model"]["outputs"] = [o for o in raw["model"]["outputs"] if o not in names]
    raw["model"]["score_params"] = {k: v for k, v in raw["model"]["score_params"].items() if k not in names}
    raw["scores"] = {k: v for k, v in raw["scores"].items() if k not in names}
    (folder / CALIBRATION_FILE).write_text(json.dumps(raw))


def declared_outputs(folder: Path, file: str = CONFIG_FILE) -> list[str]:
    return [t.name for t in text_format.Parse((folder / file).read_text(), mc.ModelConfig()).output]


def wait_for(check, what: str, limit_s: float = 60.0):
    """``check()``'s first true result; while Triton reloads, a call may be UNAVAILABLE (clients retry it)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            result = check()
            if result:
                return result
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_triton_serves_versions_of_different_score_sets(triton_install, digits_export, tmp_path, request):
    from oodguard.export.pipeline import export_model
    from oodguard.export.spec import spec_from_training

    _, _, source, checkpoint = digits_export
    repository = tmp_path / "repository"
    shutil.copytree(source, repository)
    folder = repository / "digits"
    strip_scores(folder / "1", OLDER_LACKS)  # v1: exported by an older oodguard
    lines = []
    exported = export_model(spec_from_training(checkpoint, repository, "digits"), progress=lines.append)
    assert exported.version == 2
    note = [line for line in lines if "the Triton configs declare only the outputs every served version has" in line]
    assert len(note) == 1 and all(repr(name) in note[0] for name in OLDER_LACKS)
    full = list(exported.calibration.model["scores"])
    assert all(name in full for name in OLDER_LACKS)
    common = [name for name in full if name not in OLDER_LACKS]
    for file in (CONFIG_FILE, CPU_CONFIG_FILE):  # the export declared what both versions have, in v2's order
        assert declared_outputs(folder, file) == ["logits", "features", *common]
    assert validate_repository(repository) == []

    gateway, tensor = serve_through_triton(triton_install, repository, tmp_path, request)
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        info = stub.ModelInfo(pb.ModelInfoRequest(model="digits"), timeout=30)
        assert {v.version: [t.score for t in v.thresholds] for v in info.models[0].versions} == {1: common, 2: common}
        for version in (1, 2):
            answer = stub.Predict(pb.PredictRequest(tensor=tensor, version=version), timeout=30)
            assert answer.version == version
            for item in answer.predictions:
                assert sorted(item.scores) == sorted(common) and all(np.isfinite(list(item.scores.values())))
                assert list(item.decision.deciding_scores) == ["sisome"]  # no fused served: the fallback decides

        # v3 (the full score set again) pushes v1 out of the served window: the config grows back, Triton reloads
        # it, and the gateway re-admits v2 with every score, decided by fused again
        config = text_format.Parse((folder / CONFIG_FILE).read_text(), mc.ModelConfig())
        batching = dict(max_batch_size=config.max_batch_size,
                        preferred_batch_sizes=tuple(config.dynamic_batching.preferred_batch_size))

        def publish(version, like, scores):
            """Version ``version`` as a copy of ``like``, and the configs an export of it (``scores``) writes."""
            shutil.copytree(folder / str(like), folder / f".staging-{version}")
            (folder / f".staging-{version}").rename(folder / str(version))
            write_configs(folder, ModelSignature("digits", tuple(config.input[0].dims),
                                                 len(exported.calibration.class_names), int(config.output[1].dims[0]),
                                                 tuple(scores)), **batching)
            assert declared_outputs(folder) == ["logits", "features", *scores]
            assert validate_repository(repository) == []

        def scored_with(version, scores, what):
            """The first answer of ``version`` scored with exactly ``scores`` (once the gateway saw Triton reload)."""
            def check():
                answer = stub.Predict(pb.PredictRequest(tensor=tensor, version=version), timeout=30)
                return answer if sorted(answer.predictions[0].scores) == sorted(scores) else None
            return wait_for(check, what)

        publish(3, 2, full)
        answer = scored_with(2, full, "version 2 served with every score")
        assert all(list(item.decision.deciding_scores) == ["fused"] and item.decision.driver for item in answer.predictions)
        wait_for(lambda: stub.Predict(pb.PredictRequest(tensor=tensor), timeout=30).version == 3, "version 3 served")

        # v4 (an export without gradnorm and fused again) shrinks the config under the served v3: v3 answers
        # with the common scores once the gateway has seen Triton reload (in between: UNAVAILABLE, not an error)
        publish(4, 1, common)
        answer = scored_with(3, common, "version 3 served with the common scores")
        assert all(list(item.decision.deciding_scores) == ["sisome"] for item in answer.predictions)
        assert stub.Predict(pb.PredictRequest(tensor=tensor, version=4), timeout=30).version == 4
