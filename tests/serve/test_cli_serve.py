"""`oodguard serve` as a real subprocess: startup, the demo client, SIGTERM drain; and no torch on the serving path."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from oodguard.clients.gateway_process import GatewayProcess
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

from .conftest import free_port


def test_serving_path_never_imports_torch():
    code = ("import sys; import oodguard.serve.server, oodguard.serve.embedded, oodguard.queues.sqlite, "
            "oodguard.serve.registry, oodguard.clients.demo_client, oodguard.cli; "
            "from oodguard.serve.server import Gateway; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def wait_inflight(metrics_port: int, at_least: int, timeout: float = 60.0) -> None:
    """Until the gateway's oodguard_inflight_requests gauge reaches ``at_least``."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
            value = next((float(line.split()[-1]) for line in text.splitlines()
                          if line.startswith("oodguard_inflight_requests ")), 0.0)
            if value >= at_least:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} requests in flight after {timeout} s")


def wait_draining(target: str, timeout: float = 30.0) -> None:
    """Until health says NOT_SERVING (graceful shutdown began) or the server stops answering."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status != health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                return
            time.sleep(0.02)
    raise AssertionError("the gateway did not start draining")


def test_serve_subprocess_demo_client_and_sigterm_drain(digits_export, tmp_path):
    env = {**os.environ, "OODGUARD_QUEUE_PATH": str(tmp_path / "queue.sqlite"), "OODGUARD_LISTEN": "127.0.0.1:1"}
    gateway = GatewayProcess(digits_export[2], ["--drain-timeout-s", "300", "--max-image-pixels", "36000000",
                                                "--max-request-pixels", "2304000000"],
                             work=tmp_path, metrics=True, env=env, ready_timeout_s=30)
    target, metrics_port = gateway.target, gateway.metrics_port
    try:
        gateway.start()
        demo = subprocess.run([sys.executable, "-m", "oodguard.clients.demo_client", "--target", target],
                              capture_output=True, text=True, timeout=60)
        assert demo.returncode == 0, demo.stderr
        digit_line, noise_line = demo.stdout.strip().splitlines()
        assert digit_line.startswith("digit: class 0 ") and "in-distribution" in digit_line
        assert noise_line.startswith("noise: ") and ", OOD by any(fused=" in noise_line and ", driven by " in noise_line and "queued as " in noise_line

        # an in-flight request completes across SIGTERM; later ones are refused. It is slow on purpose:
        # 32 PNGs of 6000x6000 pixels (tiny once compressed) take seconds to decode and resize (the gateway
        # above allows images that large, and that many pixels per request). Decided by the order of events,
        # never by durations (a loaded machine stretches them all): admitted, then the signal, then draining
        # seen, then the answer; the deadlines are generous, and the drain timeout is longer than any of them.
        outcome: dict = {}
        buffer = io.BytesIO()
        Image.new("L", (6000, 6000)).save(buffer, format="PNG")
        slow = pb.PredictRequest(images=pb.EncodedImages(images=[buffer.getvalue()] * 32))

        def in_flight():
            with grpc.insecure_channel(target) as channel:
                try:
                    response = pb_grpc.OODGuardStub(channel).Predict(slow, timeout=300)
                    outcome["items"] = len(response.predictions)
                    outcome["answered_at"] = time.monotonic()
                except grpc.RpcError as exc:
                    outcome["error"] = exc.code()

        thread = threading.Thread(target=in_flight)
        thread.start()
        # deterministic under load: the signal goes out once the gateway has admitted the request
        wait_inflight(metrics_port, at_least=1)
        gateway.process.send_signal(signal.SIGTERM)
        wait_draining(target, timeout=120)
        draining_seen_at = time.monotonic()
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.OODGuardStub(channel).Predict(pb.PredictRequest(tensor=pb.Tensor(
                    dtype="uint8", shape=[1, 8, 8], data=bytes(64))), timeout=120)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        thread.join(300)
        assert outcome.get("items") == 32, outcome
        assert outcome["answered_at"] > draining_seen_at  # it really was in flight across the signal
        assert gateway.process.wait(300) == 0
    finally:
        if gateway.alive():
            gateway.kill()
    log = gateway.log()
    assert "model digits version 1: decision any(fused); thresholds: sisom>" in log
    assert "fused*>" in log and "(n=289, TPR 0." in log
    assert "signal received: draining" in log and "oodguard gateway stopped" in log


def test_serve_refuses_a_bad_policy_with_exit_2(digits_export, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "oodguard.cli", "serve", "--repository", str(digits_export[2]), "--listen",
         f"127.0.0.1:{free_port()}", "--decision-scores", "sisome,odin", "--queue-path", str(tmp_path / "q.sqlite")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "oodguard serve: error:" in result.stderr and "['odin'] not exported by model 'digits' version 1" in result.stderr


def test_serve_refuses_a_repository_that_is_not_there(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "oodguard.cli", "serve", "--repository", str(tmp_path / "nowhere"), "--listen",
         f"127.0.0.1:{free_port()}", "--queue-path", str(tmp_path / "q.sqlite")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and not (tmp_path / "q.sqlite").exists()
    assert f"the model repository {tmp_path / 'nowhere'} is not a folder" in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_a_busy_port_in_one_line(digits_export, tmp_path, workers):
    """A port another process holds (here with SO_REUSEPORT, as another gateway's workers hold theirs) is refused
    before any model loads: exit 2, one error line naming the port, no traceback, health never said SERVING."""
    import socket

    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "oodguard.cli", "serve", "--repository", str(digits_export[2]), "--listen", listen,
             "--workers", workers, "--queue-path", str(tmp_path / "q.sqlite")],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"oodguard serve: error: cannot listen on {listen}: the port is in use (another gateway?) or the "
                      "address is not this host's (Address already in use); stop the other process or give --listen "
                      "HOST:PORT"], result.stderr
    assert "Traceback" not in result.stderr and "health: SERVING" not in result.stderr
    assert "version 1" not in result.stderr  # no model was loaded
