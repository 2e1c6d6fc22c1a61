"""``oodguard triton``: the documented command that starts the local CPU tritonserver, and a gateway behind it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np

from oodguard.clients.sdk import OODGuardClient
from oodguard.triton_local import free_ports
from serve.conftest import start_gateway  # noqa: F401  (fixture)


def test_oodguard_triton_serves_the_repository_to_a_gateway(triton_repository, start_gateway, tmp_path):
    grpc_port, http_port, metrics_port = free_ports(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "oodguard.cli", "triton", "--repository", str(triton_repository), "--grpc-port",
         str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port), "--poll-secs", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("tritonserver was not ready in 90 s")
        gw = start_gateway(triton_repository, backend="triton", triton_url=f"127.0.0.1:{grpc_port}")
        with OODGuardClient(gw.target, timeout=30) as client:
            noise = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
            predictions = client.predict(noise)
        assert len(predictions) == 4 and all(p.ood for p in predictions)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    assert process.returncode is not None


def test_oodguard_triton_without_its_environment_says_how_to_make_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "oodguard.cli", "triton", "--repository", str(tmp_path), "--env",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "run `bash scripts/setup_triton.sh` first" in done.stderr
