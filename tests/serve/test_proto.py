"""The committed stubs are what scripts/gen_proto.sh generates from the committed .proto."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("oodguard_pb2.py", "oodguard_pb2.pyi", "oodguard_pb2_grpc.py")


def test_committed_stubs_are_regenerated_identically(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env)
    for name in STUBS:
        assert (tmp_path / name).read_bytes() == (ROOT / "serve" / "v1" / name).read_bytes(), f"{name} is stale: run scripts/gen_proto.sh"


def test_stubs_import_inside_the_package():
    from oodguard.serve.v1 import oodguard_pb2, oodguard_pb2_grpc

    assert oodguard_pb2.DESCRIPTOR.package == "oodguard.v1"
    assert oodguard_pb2_grpc.oodguard_dot_v1_dot_oodguard__pb2 is oodguard_pb2  # the relative import
    assert "Predict" in oodguard_pb2.DESCRIPTOR.services_by_name["OODGuard"].methods_by_name
    assert hasattr(oodguard_pb2_grpc, "OODGuardStub")
