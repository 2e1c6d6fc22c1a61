import os
import socket
import subprocess
from pathlib import Path

from oodguard.cli import main
from oodguard.validate_repo import validate_repository

ROOT = Path(__file__).resolve().parents[2]


def test_demo_command_builds_a_valid_repository_and_prints_the_evaluation(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--demo", "digits", "--repository", str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    assert "AUROC digits 8-9" in out and "AUROC uniform noise" in out
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()
            if line.split() and line.split()[0] in {"sisom", "sisome", "energy", "msp", "maxlogit", "knn", "knn_centred",
                                                    "rel_mahalanobis", "cluster", "gradnorm", "fused"}}
    assert len(rows) == 11
    assert rows["sisome"][0] > 85 and rows["energy"][0] > 85  # AUROC (%) for the unknown digits 8-9
    # the default decision on the new classes: within a point of the best single score, most of them flagged
    assert rows["fused"][0] >= max(v[0] for name, v in rows.items() if name != "fused") - 1.0
    assert rows["fused"][2] > 70  # % of digits 8-9 flagged at the calibrated threshold
    assert all(values[3] > 70 for values in rows.values())  # every score sees uniform noise as OOD
    assert validate_repository(tmp_path / "repo") == []
    assert (tmp_path / "runs" / "digits-demo" / "checkpoint.pt").exists()


def test_demo_script_leaves_no_gateway_behind_when_its_client_fails(tmp_path):
    """scripts/demo.sh in a checkout whose gateway demands a token the demo client does not send: the client
    fails, the script exits non-zero, and its EXIT trap stops the gateway (the port is free again)."""
    for name in ("scripts", ".venv", "pyproject.toml", "locks"):  # a checkout that shares this one's code and venv
        (tmp_path / name).symlink_to(ROOT / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LISTEN": f"127.0.0.1:{port}", "OODGUARD_AUTH_TOKEN": "a-token-the-client-lacks"}
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)  # an orphaned gateway would hold the pipes open: a timeout
    assert done.returncode != 0 and "UNAUTHENTICATED" in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    with socket.socket() as s:  # bindable again: nothing listens there any more
        s.bind(("127.0.0.1", port))


def test_demo_script_refuses_a_busy_port_and_calls_no_other_gateway(tmp_path, digits_export):
    """Another gRPC server already holds LISTEN and answers health SERVING (as another gateway would): the
    demo's gateway refuses to start with one line naming the port, and the script stops without calling anyone
    (before, it called whichever gateway held the port)."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    for name in ("scripts", ".venv", "pyproject.toml", "locks"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "model_repository").symlink_to(digits_export[2])  # the demo model, already exported
    calls = []

    class Recorder(grpc.GenericRpcHandler):
        def service(self, handler_call_details):  # every call that reaches the other server, health aside
            if "Health" not in handler_call_details.method:
                calls.append(handler_call_details.method)
            return None

    other = grpc.server(futures.ThreadPoolExecutor(2), handlers=[Recorder()])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, other)
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        env = {**os.environ, "LISTEN": f"127.0.0.1:{port}"}
        done = subprocess.run(["bash", str(tmp_path / "scripts" / "demo.sh")], capture_output=True, text=True,
                              env=env, timeout=120, cwd=tmp_path)
    finally:
        other.stop(0)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert f"oodguard serve: error: cannot listen on 127.0.0.1:{port}: the port is in use" in done.stderr, output[-3000:]
    assert "demo: the gateway exited before serving" in done.stderr
    assert "Traceback" not in output and "digit: class" not in done.stdout and calls == []
