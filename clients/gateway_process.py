"""``oodguard serve`` as a subprocess, for the benchmarks and the tests that need the real command: started with
the flags and environment given (its output in a log file), waited for until it serves, stopped by PID.

    with GatewayProcess(repository, ["--queue-path", str(tmp / "q.sqlite")], work=tmp, metrics=True) as gateway:
        ...  # gateway.target, gateway.metrics_port, gateway.pid

Ready means: the process runs, the standard gRPC health service says SERVING, and the metrics port (when one
was asked for) accepts connections; it opens just after health says SERVING. A process that exits first, or is
not ready in time, is a :class:`GatewayStartError` whose message ends with the tail of its log (and a process
not ready in time is killed). ``stop()`` is SIGTERM to the gateway process (a ``--workers`` supervisor passes it
on to its workers and waits for their drain), then SIGKILL of its whole process group if it has not exited in
time; ``kill()`` is SIGKILL of the group at once (a crash, as clients see it). The process runs in a session of
its own, so its process group is the gateway and its workers.

:class:`ServerProcess` is the same for any command that serves gRPC health on a port (the serve benchmark's
floor server). Nothing here imports grpc until a wait begins.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

LOOPBACK = "127.0.0.1"
LOG_TAIL_CHARS = 4000  # how much of the log an error quotes
KILL_WAIT_S = 10.0  # how long a SIGKILLed process group is waited for


def free_port(host: str = LOOPBACK) -> int:
    """A port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def oodguard_command() -> list[str]:
    """``python -m oodguard.cli`` with this interpreter (the checkout this process imports)."""
    return [sys.executable, "-m", "oodguard.cli"]


def environment(drop: Sequence[str] = ("OODGUARD_",), **extra: str) -> dict[str, str]:
    """This process's environment without the variables whose names start with one of ``drop`` (an OODGUARD_*
    setting of the calling shell would change the gateway: only the flags given count), plus ``extra``."""
    prefixes = tuple(drop)
    env = {k: v for k, v in os.environ.items() if not (prefixes and k.startswith(prefixes))}
    env.update(extra)
    return env


class GatewayStartError(RuntimeError):
    """The process exited before it was ready, or was not ready in time; the message ends with its log's tail."""


class ServerProcess:
    """``command`` as a subprocess in a session of its own, serving gRPC (health included) on ``host:port``;
    stdout and stderr go to ``log_path``. ``env``: the whole environment (None: this process's). ``metrics_port``:
    a port that must also accept connections before the server counts as ready."""

    def __init__(self, command: Sequence[str | os.PathLike | int | float], *, name: str, port: int, log_path: Path,
                 host: str = LOOPBACK, cwd: Path | None = None, env: Mapping[str, str] | None = None,
                 metrics_port: int | None = None, ready_timeout_s: float = 60.0, stop_timeout_s: float = 10.0):
        self.command = [str(part) if isinstance(part, (int, float)) else os.fspath(part) for part in command]
        self.name, self.host, self.port, self.metrics_port = name, host, port, metrics_port
        self.log_path = Path(log_path)
        self.cwd, self.env = cwd, None if env is None else dict(env)
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.process: subprocess.Popen | None = None

    # -- what callers read ------------------------------------------------------------------------
    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The process's PID, which is also its process group's id."""
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited (and been waited for), else None."""
        return None if self.process is None else self.process.poll()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """Everything it wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log()[-chars:]

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> Self:
        """Start it; with ``wait``, return once it is ready (see :meth:`wait_ready`)."""
        if self.alive():
            raise RuntimeError(f"{self.name} already runs (PID {self.process.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                                            env=self.env, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Seconds until health said SERVING (and the metrics port, if any, accepted a connection), polled every
        0.1 s; :class:`GatewayStartError` if the process exits first or ``timeout_s`` (default
        ``ready_timeout_s``) passes, in which case the process is killed."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        process = self._started()
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        began = time.monotonic()
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if process.poll() is not None:
                    raise GatewayStartError(f"{self.name} exited with {process.returncode} before it was serving; "
                                            f"its log ends:\n{self.log_tail()}")
                try:
                    serving = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status \
                        == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    serving = False
                if serving and self._metrics_open():
                    return time.monotonic() - began
                if time.monotonic() - began > timeout_s:
                    self.kill()
                    raise GatewayStartError(f"{self.name} was not serving within {timeout_s:g} s (killed); its log "
                                            f"ends:\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM to the process; SIGKILL to its process group if it has not exited within ``timeout_s`` (default
        ``stop_timeout_s``). Its exit status (None: never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                return self.kill()
        return self.process.returncode

    def kill(self) -> int | None:
        """SIGKILL to its whole process group at once; its exit status (None: never started)."""
        if self.process is None:
            return None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.process.wait(KILL_WAIT_S)

    def __enter__(self) -> Self:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inside -----------------------------------------------------------------------------------
    def _started(self) -> subprocess.Popen:
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process

    def _metrics_open(self) -> bool:
        if self.metrics_port is None:
            return True
        try:
            socket.create_connection((self.host, self.metrics_port), timeout=1).close()
            return True
        except OSError:
            return False


class GatewayProcess(ServerProcess):
    """``oodguard serve --repository REPOSITORY --listen HOST:PORT [flags below] *args`` in ``work`` (its
    working folder unless ``cwd``; the log is ``work/NAME.log`` unless ``log_path``).

    ``port``: None picks a free one. ``metrics``: a free port for ``--metrics-port`` (``metrics_port``).
    ``workers``: ``--workers N``. ``auth_token``: written to ``work/NAME.token``, given as ``--auth-token-file``
    (health answers without it). ``env``: the whole environment (None: this process's; :func:`environment`
    makes one without the caller's OODGUARD_* settings). ``command``: what runs ``oodguard`` (default
    :func:`oodguard_command`)."""

    def __init__(self, repository: Path | str, args: Sequence[str | os.PathLike | int | float] = (), *, work: Path,
                 name: str = "gateway", host: str = LOOPBACK, port: int | None = None, metrics: bool = False,
                 workers: int | None = None, auth_token: str | None = None, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, log_path: Path | None = None, command: Sequence[str] | None = None,
                 ready_timeout_s: float = 60.0, stop_timeout_s: float = 10.0):
        work = Path(work)
        port = free_port(host) if port is None else port
        metrics_port = free_port(host) if metrics else None
        argv: list = [*(oodguard_command() if command is None else command), "serve", "--repository", str(repository),
                "--listen", f"{host}:{port}"]
        if metrics_port is not None:
            argv += ["--metrics-port", str(metrics_port)]
        if workers is not None:
            argv += ["--workers", str(workers)]
        if auth_token:
            token_file = work / f"{name}.token"
            token_file.write_text(auth_token + "\n")
            argv += ["--auth-token-file", str(token_file)]
        argv += args
        super().__init__(argv, name=name, port=port, log_path=work / f"{name}.log" if log_path is None else log_path,
                         host=host, cwd=work if cwd is None else cwd, env=env, metrics_port=metrics_port,
                         ready_timeout_s=ready_timeout_s, stop_timeout_s=stop_timeout_s)
        self.repository, self.work, self.workers, self.auth_token = Path(repository), work, workers, auth_token or ""
