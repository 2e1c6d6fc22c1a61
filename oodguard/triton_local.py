"""A local ``tritonserver`` on a CPU machine: the ``nvidia-pytriton==0.7.0`` wheel's Triton 2.51 binary in
``.venv-triton`` (``bash scripts/setup_triton.sh`` makes it), with its python backend running each version's
``model.py`` (ONNX Runtime) under the CPU config ``configs/cpu.pbtxt`` (``--model-config-name=cpu``).

What it takes (all done here): the python backend stub built for this Python (copied into ``backends/python``
by the setup script), ``LD_LIBRARY_PATH`` holding the interpreter's ``LIBDIR`` (the stub loads *that*
libpython) and the wheel's bundled libraries, ``.venv-triton/bin`` first on ``PATH`` with ``VIRTUAL_ENV`` set
(the stub runs ``model.py`` with that environment's numpy < 2 and onnxruntime) and no ``PYTHONPATH`` /
``PYTHONHOME``; the repository in poll mode, so a new export is picked up.

- ``oodguard triton --repository DIR`` (or ``bash scripts/triton.sh --repository DIR``) runs it in the
  foreground on 127.0.0.1:8001 (gRPC), :8000 (HTTP) and :8002 (metrics); then
  ``oodguard serve --backend triton --triton-url 127.0.0.1:8001 --repository DIR``.
- :class:`TritonServer` starts one on free loopback ports and stops it by PID (the integration tests and
  ``bench/serve_benchmark.py`` use it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout (editable install), where .venv-triton lives
PY_TAG = f"{sys.version_info[0]}.{sys.version_info[1]}"


def triton_env_dir() -> Path:
    return Path(os.environ.get("OODGUARD_TRITON_ENV") or ROOT / ".venv-triton")


@dataclass(frozen=True)
class TritonInstall:
    env_dir: Path  # the virtualenv whose Python runs model.py (numpy < 2, onnxruntime)
    server_dir: Path  # pytriton/tritonserver: bin/tritonserver, backends/
    libdir: str  # the interpreter's LIBDIR: the python backend stub must load *this* libpython

    @classmethod
    def find(cls, env_dir: Path) -> "TritonInstall | str":
        python = env_dir / "bin" / "python"
        if not python.exists():
            return f"no Triton environment at {env_dir}"
        probe = subprocess.run(
            [str(python), "-c", "import importlib.util as u, sysconfig; s = u.find_spec('pytriton'); "
             "print(s.submodule_search_locations[0] if s else ''); print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            return f"{python} does not run: {probe.stderr.strip()[-500:]}"
        package, libdir = probe.stdout.splitlines()
        server_dir = Path(package) / "tritonserver" if package else None
        if server_dir is None or not (server_dir / "bin" / "tritonserver").exists():
            return f"{env_dir} has no tritonserver (nvidia-pytriton is not installed)"
        if not (server_dir / "backends" / "python" / "triton_python_backend_stub").exists():
            return f"{server_dir}/backends/python has no triton_python_backend_stub"
        return cls(env_dir, server_dir, libdir)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [self.libdir, str(self.server_dir.parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
        # model.py sees the packages of the venv whose bin is first on PATH; the stub needs bash.
        bash_dir = str(Path(shutil.which("bash") or "/bin/bash").parent)
        env["PATH"] = os.pathsep.join([str(self.env_dir / "bin"), env.get("PATH", ""), bash_dir])
        env["VIRTUAL_ENV"] = str(self.env_dir)
        for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE"):
            env.pop(name, None)
        return env


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class TritonServer:
    """A tritonserver process on loopback ports serving ``repository`` with the CPU configs, in poll mode.

    ``start()`` returns when the server reports ready; ``stop()`` ends it by PID (SIGTERM, then SIGKILL);
    ``kill()`` is an abrupt SIGKILL; ``restart()`` starts it again on the same ports.
    """

    install: TritonInstall
    repository: Path
    log_path: Path
    poll_secs: int = 1
    ready_timeout_s: float = 60.0
    ports: dict[str, int] = field(default_factory=dict)
    address: str = "127.0.0.1"
    process: subprocess.Popen | None = None
    started_in_s: float | None = None

    @property
    def url(self) -> str:
        return f"{self.address}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.ports['http']}"

    def command(self) -> list[str]:
        return [
            str(self.install.server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            "--model-config-name=cpu",
            f"--backend-directory={self.install.server_dir / 'backends'}",
            "--model-control-mode=poll",
            f"--repository-poll-secs={self.poll_secs}",
            "--disable-auto-complete-config",
            f"--grpc-address={self.address}", f"--grpc-port={self.ports['grpc']}",
            f"--http-address={self.address}", f"--http-port={self.ports['http']}",
            f"--metrics-address={self.address}", f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
        ]

    def start(self) -> "TritonServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"tritonserver already runs (PID {self.process.pid})")
        if not self.ports:
            self.ports = dict(zip(("grpc", "http", "metrics"), free_ports(3)))
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.install.environment(), cwd=self.repository,
                                            start_new_session=True)
        self.wait_ready(began)
        self.started_in_s = time.monotonic() - began
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, began: float) -> None:
        deadline = began + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with status {self.process.returncode} before it was "
                                   f"ready; log:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"tritonserver was not ready within {self.ready_timeout_s:.0f} s; log:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    def _signal(self, sig: int) -> None:
        # The server runs in its own session; its python backend stubs are its children in that group.
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM by PID (the server finishes in-flight requests), SIGKILL if it has not exited in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(10)
        self._signal(signal.SIGKILL)  # stubs left behind, if any
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (a crash, as clients see it)."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def restart(self) -> "TritonServer":
        self.stop()
        return self.start()


def build_parser():
    """The parser of ``oodguard triton``: abbreviated flags refused, every default named in its help."""
    import argparse

    parser = argparse.ArgumentParser(prog="oodguard triton", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--repository", type=Path, required=True, help="model repository (oodguard export writes it)")
    parser.add_argument("--address", default="127.0.0.1", help="address of all three endpoints (default %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port, the gateway's --triton-url "
                        "(default %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port, health at /v2/health/ready "
                        "(default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton's Prometheus metrics port "
                        "(default %(default)s)")
    parser.add_argument("--poll-secs", type=int, default=5, help="how often the repository is polled for versions, "
                        "seconds (default %(default)s)")
    parser.add_argument("--env", type=Path, default=triton_env_dir(), help="the Triton environment: "
                        "$OODGUARD_TRITON_ENV, else .venv-triton in the checkout (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``oodguard triton``: run the local CPU tritonserver in the foreground (it replaces this process)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    install = TritonInstall.find(args.env)
    if isinstance(install, str):
        print(f"oodguard triton: {install}; run `bash scripts/setup_triton.sh` first", file=sys.stderr)
        return 2
    if not args.repository.is_dir():
        print(f"oodguard triton: the model repository {args.repository} is not a folder", file=sys.stderr)
        return 2
    server = TritonServer(install, args.repository.resolve(), Path(os.devnull), poll_secs=args.poll_secs,
                          address=args.address,
                          ports={"grpc": args.grpc_port, "http": args.http_port, "metrics": args.metrics_port})
    command = server.command()
    print("oodguard triton: " + " ".join(command), file=sys.stderr, flush=True)
    os.chdir(server.repository)
    os.execve(command[0], command, install.environment())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
