"""A real tritonserver serves two versions of one model whose class counts differ (v2 added a class), with
one config, behind the gateway: each version answers with its own logits width and class names."""

from __future__ import annotations

import shutil

import grpc
import numpy as np

from gateway_fixtures import GatewayThread
from oodguard.triton_local import TritonServer

from oodguard.serve.settings import Settings
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc
from oodguard.validate_repo import validate_repository


def test_triton_serves_versions_of_different_class_counts(triton_install, digits_two_versions, tmp_path, request):
    source, _, _ = digits_two_versions
    repository = tmp_path / "repository"
    shutil.copytree(source, repository)
    assert validate_repository(repository) == []
    triton = TritonServer(triton_install, repository, tmp_path / "tritonserver.log").start()
    request.addfinalizer(triton.stop)
    gateway = GatewayThread(Settings(repository=repository, listen="127.0.0.1:0", backend="triton",
                                     triton_url=triton.url, queue_path=tmp_path / "queue.sqlite", poll_interval_s=0.5))
    request.addfinalizer(lambda: gateway.stop(1.0))
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    tensor = pb.Tensor(dtype="uint8", shape=[4, 8, 8], data=images.tobytes())
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
