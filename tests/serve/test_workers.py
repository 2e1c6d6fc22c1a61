"""``oodguard serve --workers N`` as real processes: the workers share the port and all answer, a SIGKILLed worker
is restarted while the others keep answering, SIGTERM drains every worker (exit 0), ``/metrics`` adds up the
counters of every worker, and a new model version reaches every worker. Which worker answered is read from the
workers' own prometheus_client multiprocess files (one per PID). Every process is stopped by PID."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.multiprocess import MultiProcessCollector

from gateway_fixtures import free_port
from oodguard.clients.gateway_process import GatewayProcess, environment
from oodguard.serve.settings import Settings, SettingsError
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc
from oodguard.serve.workers import reserve_port

CHANNELS = 12  # connections: the kernel spreads them over the workers


class Served(GatewayProcess):
    """``oodguard serve --workers N`` in its own session, with a metrics port; returns once health says SERVING,
    the metrics port is open, and every worker serves."""

    def __init__(self, repository: Path, workdir: Path, workers: int = 2, *extra: str):
        super().__init__(repository, ["--queue-path", workdir / "queue.sqlite", "--poll-interval-s", "0.3",
                                      "--drain-timeout-s", "5", *extra],
                         work=workdir, name="serve", metrics=True, workers=workers,
                         env=environment(("OODGUARD_", "PROMETHEUS_")), stop_timeout_s=30)
        self.start()
        self.wait_workers(workers)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return sorted(int(p) for p in path.read_text().split())
        except OSError:
            return []

    def wait_workers(self, n: int, exclude: tuple[int, ...] = (), timeout_s: float = 60.0) -> list[int]:
        """Wait until ``n`` workers (none of ``exclude``) run and the log says they serve; their PIDs."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"supervisor exited {self.process.returncode}:\n{self.log()[-4000:]}"
            pids = [p for p in self.children() if p not in exclude]
            serving = [p for p in pids if re.search(rf" {p} oodguard.serve: health: SERVING", self.log())]
            if len(serving) == n and len(pids) == n and "gateway workers serving on" in self.log():
                return pids
            assert time.monotonic() < deadline, f"{n} workers not serving:\n{self.log()[-4000:]}"
            time.sleep(0.1)

    def metrics_dir(self) -> Path:
        return Path(re.search(r"metrics files in (\S+)\)", self.log()).group(1))

    def requests_by_worker(self, version: str | None = None) -> dict[int, float]:
        """OK Predict calls counted in each worker's own file (by PID)."""
        out = {}
        for path in self.metrics_dir().glob("counter_*.db"):
            pid = int(path.stem.split("_")[1])
            total = 0.0
            for metric in MultiProcessCollector.merge([str(path)]):
                for s in metric.samples:
                    if s.name == "oodguard_requests_total" and s.labels.get("code") == "OK" and \
                            version in (None, s.labels.get("version")):
                        total += s.value
            out[pid] = total
        return out

    def scrape(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()


def channels(target: str, n: int = CHANNELS) -> list[grpc.Channel]:
    """``n`` channels with connections of their own (gRPC shares one connection between equal channels)."""
    return [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)]


def tensor_request(x: np.ndarray) -> pb.PredictRequest:
    return pb.PredictRequest(tensor=pb.Tensor(dtype="uint8", shape=list(x.shape), data=x.tobytes()))


def predict_all(chans: list[grpc.Channel], images: np.ndarray, rounds: int = 3,
                wait_for_ready: bool = False) -> list[pb.PredictResponse]:
    out = []
    for _ in range(rounds):
        for i, channel in enumerate(chans):
            out.append(pb_grpc.OODGuardStub(channel).Predict(tensor_request(images[i % len(images)][None]), timeout=10,
                                                             wait_for_ready=wait_for_ready))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def served(tmp_path):
    started: list[Served] = []

    def start(repository: Path, workers: int = 2, *extra: str) -> Served:
        s = Served(repository, tmp_path, workers, *extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()  # SIGTERM: the supervisor removes its metrics directory (SIGKILL would leave it behind)


def test_workers_setting_takes_auto_and_bounds():
    assert Settings.from_sources({"repository": "r", "workers": "auto"}).workers == 0
    assert Settings(repository=Path("r"), workers=0).effective_workers == len(os.sched_getaffinity(0))
    assert Settings.from_sources({"repository": "r"}, env={"OODGUARD_WORKERS": "3"}).effective_workers == 3
    with pytest.raises(SettingsError, match="workers"):
        Settings(repository=Path("r"), workers=-1)
    with pytest.raises(SettingsError, match="workers"):
        Settings.from_sources({"repository": "r", "workers": "many"})


def test_reserve_port_resolves_port_0_once_and_lets_others_bind_it():
    import socket

    sock, listen = reserve_port("127.0.0.1:0")
    try:
        port = int(listen.rpartition(":")[2])
        assert port > 0 and listen == f"127.0.0.1:{port}"
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))  # what every worker's gRPC server does
        other.close()
    finally:
        sock.close()


def test_workers_share_the_port_all_answer_and_metrics_add_up(served, digits_export, digits_test_images):
    s = served(digits_export[2], 2)
    images = digits_test_images[0]
    chans = channels(s.target)
    try:
        answers = predict_all(chans, images, rounds=4)
    finally:
        for c in chans:
            c.close()
    assert len(answers) == 4 * CHANNELS and all(a.predictions for a in answers)
    workers = s.children()
    by_worker = s.requests_by_worker()
    assert set(workers) <= set(by_worker), by_worker
    assert all(by_worker[p] > 0 for p in workers), f"a worker answered nothing: {by_worker}"
    assert sum(by_worker.values()) == len(answers)
    time.sleep(1.5)  # each worker writes its scores and state to the files once a second
    text = s.scrape()
    assert metric_sum(text, "oodguard_requests_total", code="OK") == len(answers)
    assert metric_sum(text, "oodguard_items_total") == len(answers)
    assert metric_sum(text, "oodguard_request_duration_seconds_count") == len(answers)
    assert metric_sum(text, "oodguard_score_count", score="fused") == len(answers)  # the histograms merged
    assert metric_sum(text, "oodguard_serving") == 1.0
    assert metric_sum(text, "oodguard_model_info", model="digits", version="1") == 1.0
    assert "oodguard_score_parts" not in text  # the hidden bucket gauges stay hidden
    assert "# TYPE oodguard_score histogram" in text and "# TYPE oodguard_requests_total counter" in text


def test_a_killed_worker_is_restarted_while_the_others_answer(served, digits_export, digits_test_images):
    s = served(digits_export[2], 2)
    images = digits_test_images[0]
    victim, survivor = s.children()
    os.kill(victim, signal.SIGKILL)
    chans = channels(s.target, 4)
    try:
        # right away, through the live worker: a connection the kernel had queued on the dead worker's socket is
        # reset, and a client waiting for ready reconnects (to the live one) instead of failing the call
        assert len(predict_all(chans, images, rounds=1, wait_for_ready=True)) == 4
        back = s.wait_workers(2, exclude=(victim,), timeout_s=30)
        assert victim not in back and survivor in back
        assert len(predict_all(chans, images, rounds=1)) == 4
    finally:
        for c in chans:
            c.close()
    # the supervisor logs "serving again" when it next polls the new worker's ready pipe, after the worker's own line
    deadline = time.monotonic() + 10
    while "serving again" not in s.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = s.log()
    assert f"(PID {victim}) died (exit code -9); restarting it" in log and "serving again" in log
    assert s.stop() == 0


def test_sigterm_drains_every_worker_and_exits_0(served, digits_export, digits_test_images):
    s = served(digits_export[2], 2)
    workers, files = s.children(), s.metrics_dir()
    chans = channels(s.target, 4)
    try:
        predict_all(chans, digits_test_images[0], rounds=1)
    finally:
        for c in chans:
            c.close()
    assert s.stop() == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    log = s.log()
    assert log.count("oodguard gateway stopped") == 2 and "all workers stopped" in log
    assert "Logging error" not in log  # every log call's arguments match its message
    assert not files.exists()  # the multiprocess metrics directory belongs to one serve start


def test_metrics_dirs_of_dead_supervisors_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """A --workers group killed with SIGKILL leaves its metrics folder; the next supervisor removes it (and
    nothing of a supervisor still running, nor other folders)."""
    import subprocess
    import tempfile

    from oodguard.serve import workers

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"oodguard-metrics-{dead.pid}-abc"
    live = tmp_path / f"oodguard-metrics-{os.getpid()}-def"
    other = tmp_path / "oodguard-metrics-notapid"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    assert workers.remove_stale_metrics_dirs() == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_hot_reload_reaches_every_worker(served, repo_copy, digits_test_images):
    s = served(repo_copy, 2)
    staging = repo_copy / "digits" / ".staging-2"
    shutil.copytree(repo_copy / "digits" / "1", staging)
    staging.rename(repo_copy / "digits" / "2")
    chans = channels(s.target)
    try:
        deadline = time.monotonic() + 30
        while True:
            versions = {a.version for a in predict_all(chans, digits_test_images[0], rounds=1)}
            if versions == {2}:
                break
            assert time.monotonic() < deadline, f"still answering versions {versions}"
            time.sleep(0.2)
        predict_all(chans, digits_test_images[0], rounds=2)
    finally:
        for c in chans:
            c.close()
    on_v2 = s.requests_by_worker(version="2")
    assert all(on_v2.get(p, 0) > 0 for p in s.children()), f"a worker never answered with version 2: {on_v2}"


def test_a_worker_that_cannot_start_stops_the_gateway_with_exit_1(digits_export, tmp_path):
    command = [sys.executable, "-m", "oodguard.cli", "serve", "--repository", str(digits_export[2]), "--listen",
               f"127.0.0.1:{free_port()}", "--workers", "2", "--decision-scores", "nosuchscore",
               "--decision-fallback", "none", "--queue-path", str(tmp_path / "q.sqlite")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    assert "before it was serving: stopping" in done.stderr and "restarting" not in done.stderr


def test_grpc_health_is_serving_on_every_worker(served, digits_export):
    s = served(digits_export[2], 2)
    seen = set()
    for channel in channels(s.target):
        with channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            seen.add(status)
    assert seen == {health_pb2.HealthCheckResponse.SERVING}
