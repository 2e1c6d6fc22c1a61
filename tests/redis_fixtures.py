"""A real ``redis-server`` on a free loopback port for the Redis queue tests, stopped by PID.

``redis-server`` comes from the Debian package (``bash scripts/setup_redis.sh``). Without it the tests that
need it skip with the reason, unless ``OODGUARD_REQUIRE_REDIS=1`` (set by .ci/run), where its absence is a
failure. The server runs with AOF (``appendfsync always``), so what it acknowledged survives a stop/restart.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from missing import missing


def redis_server_binary() -> str:
    """The redis-server path, or a skip (a failure with OODGUARD_REQUIRE_REDIS=1) saying it is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server is not installed; run `bash scripts/setup_redis.sh`", "OODGUARD_REQUIRE_REDIS")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """``start()`` returns once it answers PING; ``stop()`` is SIGTERM by PID (then SIGKILL); ``kill()`` is
    SIGKILL; ``start()`` again reuses the port and the data folder."""

    binary: str
    data_dir: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> "RedisServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"redis-server already runs (PID {self.process.pid})")
        self.port = self.port or _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                   "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                   "--protected-mode", "yes", "--logfile", str(self.data_dir / "redis.log")]
        deadline = time.monotonic() + timeout_s
        while True:  # the port may still be in TIME_WAIT/held right after a stop
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if _ping(self.port):
                    return self
                time.sleep(0.02)
            if self.process.poll() is None:
                self.kill()
                raise RuntimeError(f"redis-server did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.data_dir / "redis.log").read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process = None


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server for one test (``.url``, ``.port``, ``.stop()``, ``.start()``); stopped by PID."""
    server = RedisServer(redis_server_binary(), tmp_path / "redis-data")
    try:
        yield server.start()
    finally:
        server.stop()
