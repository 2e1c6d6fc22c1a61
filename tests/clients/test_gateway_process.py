"""oodguard.clients.gateway_process: the one helper that starts ``oodguard serve`` as a subprocess (benchmarks and
tests), waits until it serves, and stops it by PID."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oodguard.clients.gateway_process import (GatewayProcess, GatewayStartError, ServerProcess, environment,
                                              oodguard_command)
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc


def test_the_command_holds_the_flags_asked_for_and_the_token_file(tmp_path):
    gateway = GatewayProcess("repo", ["--drain-timeout-s", 1, tmp_path / "x"], work=tmp_path, name="main", port=5005,
                             metrics=True, workers=2, auth_token="s3cret")
    assert gateway.command == [*oodguard_command(), "serve", "--repository", "repo", "--listen", "127.0.0.1:5005",
                               "--metrics-port", str(gateway.metrics_port), "--workers", "2",
                               "--auth-token-file", str(tmp_path / "main.token"), "--drain-timeout-s", "1",
                               str(tmp_path / "x")]
    assert (tmp_path / "main.token").read_text() == "s3cret\n"
    assert gateway.target == "127.0.0.1:5005" and gateway.metrics_port not in (None, 5005)
    assert gateway.log_path == tmp_path / "main.log" and gateway.cwd == tmp_path
    assert gateway.process is None and gateway.returncode is None and not gateway.alive()
    assert gateway.stop() is None and gateway.kill() is None  # never started: nothing to stop
    with pytest.raises(RuntimeError, match="main was not started"):
        gateway.pid


def test_environment_drops_the_callers_oodguard_settings(monkeypatch):
    monkeypatch.setenv("OODGUARD_LISTEN", "0.0.0.0:1")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nowhere")
    env = environment(PYTHONPATH="/src")
    assert "OODGUARD_LISTEN" not in env
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/nowhere" and env["PYTHONPATH"] == "/src"
    assert "PROMETHEUS_MULTIPROC_DIR" not in environment(("OODGUARD_", "PROMETHEUS_"))
    assert environment(())["OODGUARD_LISTEN"] == "0.0.0.0:1"


def test_a_gateway_starts_serves_and_stops_with_exit_0(digits_export, tmp_path):
    with GatewayProcess(digits_export[2], ["--queue-path", tmp_path / "q.sqlite", "--drain-timeout-s", "1"],
                        work=tmp_path, metrics=True, auth_token="t0ken") as gateway:
        assert gateway.alive() and Path(f"/proc/{gateway.pid}").exists()
        with grpc.insecure_channel(gateway.target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            request = pb.PredictRequest(tensor=pb.Tensor(dtype="uint8", shape=[1, 8, 8], data=bytes(64)))
            with pytest.raises(grpc.RpcError) as refused:  # the token file was given
                pb_grpc.OODGuardStub(channel).Predict(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = pb_grpc.OODGuardStub(channel).Predict(request, timeout=10,
                                                          metadata=(("authorization", "Bearer t0ken"),))
            assert reply.model == "digits" and len(reply.predictions) == 1
        socket.create_connection(("127.0.0.1", gateway.metrics_port), timeout=5).close()  # ready: metrics open
    assert gateway.returncode == 0 and not gateway.alive()  # SIGTERM: drained and exited cleanly
    assert "oodguard gateway stopped" in gateway.log()
    assert gateway.stop() == 0  # stopping again is harmless


def test_a_gateway_that_cannot_start_reports_its_exit_and_log_tail(tmp_path):
    gateway = GatewayProcess(tmp_path / "nowhere", ["--queue-path", tmp_path / "q.sqlite"], work=tmp_path,
                             name="broken")
    with pytest.raises(GatewayStartError) as failed:
        gateway.start()
    message = str(failed.value)
    assert message.startswith("broken exited with 2 before it was serving; its log ends:\n")
    assert f"the model repository {tmp_path / 'nowhere'} is not a folder" in message
    assert gateway.returncode == 2


def test_a_server_not_ready_in_time_is_killed_and_its_log_quoted(tmp_path):
    server = ServerProcess([sys.executable, "-c", "import time; print('still loading', flush=True); time.sleep(120)"],
                           name="slow", port=1, log_path=tmp_path / "slow.log", ready_timeout_s=1)
    with pytest.raises(GatewayStartError, match=r"slow was not serving within 1 s \(killed\)") as failed:
        server.start()
    assert "still loading" in str(failed.value)
    assert server.returncode == -9  # killed, not waited for (it sleeps 120 s)


def test_stop_sends_sigkill_to_the_group_when_sigterm_is_ignored(tmp_path):
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print(child.pid, flush=True); time.sleep(120)")
    server = ServerProcess([sys.executable, "-c", code], name="stubborn", port=1, log_path=tmp_path / "s.log")
    server.start(wait=False)
    deadline = time.monotonic() + 60
    while not server.log().strip() and time.monotonic() < deadline:  # its handler is set once it printed
        time.sleep(0.05)
    child = int(server.log().split()[0])
    assert server.stop(timeout_s=0.5) == -9
    deadline = time.monotonic() + 10  # the child, in the same group, was killed too (init reaps it)
    while running(child):
        assert time.monotonic() < deadline, "the child outlived the SIGKILL of the group"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
