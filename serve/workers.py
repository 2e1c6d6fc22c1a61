"""``oodguard serve --workers N``: pre-forked gateway processes sharing one port, and their supervisor.

One gateway process runs every request on one Python event loop, so it uses about one core. The established
way to use more with Python gRPC (gRPC's ``examples/python/multiprocessing``) is to fork worker processes
*before* any gRPC or ONNX Runtime state exists (neither survives a fork), each binding the same port with
``SO_REUSEPORT`` (the kernel spreads incoming connections over them) and running its own server:

* the supervisor (this process) reserves the port (a bound ``SO_REUSEPORT`` socket, which also resolves
  port 0 to one port for all workers), makes a fresh prometheus_client multiprocess directory, and forks the
  workers. It imports neither ``grpc`` servers nor ONNX Runtime: it never serves a request;
* each worker is a complete gateway (:class:`~oodguard.serve.server.Gateway` with a :class:`WorkerSlot`): its
  own backend (an embedded session with ``cores / N`` intra-op threads unless ``--intra-op-threads`` says
  otherwise, or its own Triton connection), micro-batcher, registry polling the repository (so hot reload
  reaches every worker), health service and queue connection (SQLite: one WAL writer per worker, SQLite's
  lock orders their transactions; Redis: a spool file per worker, see
  :func:`~oodguard.queues.spool.worker_spool_path`). Worker 0 serves ``/metrics`` for all of them
  (:mod:`oodguard.serve.metrics`, multiprocess mode);
* a worker that dies is logged and restarted (same index: same spool file), after
  :data:`RESTART_MIN_S`, doubling up to :data:`RESTART_MAX_S` while restarts die before they serve. A
  worker that fails to start in the first place stops the whole gateway (exit 1): a bad setting or model
  repository must not become a restart loop;
* SIGTERM (or SIGINT) is passed to every worker, which drains as a single gateway does; the supervisor exits
  0 only when every worker exited 0, and kills workers still running ``drain_timeout_s`` +
  :data:`STOP_MARGIN_S` later. Workers get SIGTERM too when the supervisor itself dies (``PR_SET_PDEATHSIG``).

Clients spread over the workers by connection: one gRPC channel is one connection, so one channel reaches
one worker; several channels (or a load balancer) are needed to use them all.

``--workers 1`` (the default) runs the gateway in this process, without a supervisor.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .listen import ensure_port_free
from .settings import Settings, WorkerSlot

log = logging.getLogger("oodguard.serve.workers")

#: delay before a dead worker is restarted, doubled per restart that dies before serving, up to the max
RESTART_MIN_S, RESTART_MAX_S = 0.5, 30.0
#: how often the supervisor looks at its workers, seconds
POLL_S = 0.1
#: workers still running this long after drain_timeout_s past SIGTERM are killed
STOP_MARGIN_S = 15.0
PR_SET_PDEATHSIG = 1


@dataclass
class _Worker:
    slot: WorkerSlot
    pid: int = 0
    ready_fd: int = -1  # read end of the pipe the worker writes one byte to once it listens
    ready: bool = False
    failures: int = 0  # restarts in a row that died before serving
    restart_at: float | None = None  # monotonic time of a pending restart
    exit_code: int | None = None


def run(settings: Settings) -> int:
    """``oodguard serve``: one gateway in this process, or the supervisor of ``settings.effective_workers``."""
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    count = settings.effective_workers
    if count == 1:
        from .server import serve

        return asyncio.run(serve(settings))
    return Supervisor(settings, count).run()


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """A bound (not listening) ``SO_REUSEPORT`` socket on ``listen`` and the address with its port resolved:
    every worker binds that address too, and port 0 becomes one free port for all of them."""
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    family, kind, proto, _, address = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    ensure_port_free(listen)  # even one another gateway's workers share with SO_REUSEPORT
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {listen}: {exc}") from exc
    return sock, f"{host}:{sock.getsockname()[1]}"


#: the multiprocess metrics folder of one ``--workers`` gateway: ``<tmp>/oodguard-metrics-<supervisor PID>-*``
METRICS_DIR_PREFIX = "oodguard-metrics-"


def remove_stale_metrics_dirs() -> list[Path]:
    """Remove the metrics folders that supervisors no longer running left behind (a group killed with SIGKILL
    cannot remove its own); the removed paths."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = folder.name[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean
        return True
    return True


class Supervisor:
    def __init__(self, settings: Settings, count: int):
        self.settings = settings
        self.count = count
        self.workers = [_Worker(WorkerSlot(i, count)) for i in range(count)]
        self.stopping = False
        self._stop_deadline: float | None = None
        self._worker_settings: Settings | None = None
        self._metrics_dir = ""

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        sock, listen = reserve_port(self.settings.listen)
        remove_stale_metrics_dirs()
        self._metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir  # read by the workers' prometheus_client
        share = max(1, len(os.sched_getaffinity(0)) // self.count)
        self._worker_settings = dataclasses.replace(self.settings, listen=listen,
                                                    intra_op_threads=self.settings.intra_op_threads or share)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            for worker in self.workers:
                self._spawn(worker)
            if not self._wait_first_start():
                self._stop_all()
                self._wait_all()
                return 1
            log.info("%d gateway workers serving on %s (PIDs %s; metrics files in %s)", self.count, listen,
                     ", ".join(str(w.pid) for w in self.workers), self._metrics_dir)
            self._supervise()
        finally:
            sock.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        failed = [w for w in self.workers if w.exit_code != 0]
        for w in failed:
            log.error("worker %d (PID %d) ended with exit code %s", w.slot.index, w.pid, w.exit_code)
        if failed:
            log.info("stopped; %d worker(s) did not drain cleanly", len(failed))
        else:
            log.info("all workers stopped")
        return 0 if not failed else 1

    def _on_signal(self, signum: int, frame) -> None:
        if not self.stopping:
            log.info("signal %d received: draining %d workers (up to %.0fs)", signum, self.count,
                     self.settings.drain_timeout_s)
            self._stop_all()

    def _stop_all(self) -> None:
        self.stopping = True
        self._stop_deadline = time.monotonic() + self.settings.drain_timeout_s + STOP_MARGIN_S
        for w in self.workers:
            w.restart_at = None
            if w.pid and w.exit_code is None:
                _signal(w.pid, signal.SIGTERM)

    # -- workers --------------------------------------------------------------------------------
    def _spawn(self, worker: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            code = 1
            try:
                os.close(read_fd)
                code = _worker_main(self._worker_settings, worker.slot, write_fd, os.getppid())
            except BaseException:  # noqa: BLE001 - logged, then the exit code tells the supervisor
                log.exception("worker %d failed", worker.slot.index)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(write_fd)
        worker.pid, worker.ready_fd, worker.ready, worker.exit_code, worker.restart_at = pid, read_fd, False, None, None

    def _wait_first_start(self) -> bool:
        """Wait until every worker listens; False (logged) when one died first."""
        for w in self.workers:
            if os.read(w.ready_fd, 1) != b"1":
                self.stopping = True  # no restart: the gateway stops
                self._reap(block=True)
                log.error("worker %d (PID %d) exited with code %s before it was serving: stopping", w.slot.index,
                          w.pid, w.exit_code)
                return False
            self._mark_ready(w)
        return True

    def _mark_ready(self, w: _Worker) -> None:
        w.ready, w.failures = True, 0
        os.close(w.ready_fd)
        w.ready_fd = -1

    def _supervise(self) -> None:
        while True:
            self._reap(block=False)
            self._check_ready()
            now = time.monotonic()
            if self.stopping:
                if all(w.exit_code is not None or not w.pid for w in self.workers):
                    return
                if self._stop_deadline is not None and now > self._stop_deadline:
                    for w in self.workers:
                        if w.exit_code is None:
                            log.error("worker %d (PID %d) still running after the drain timeout: killing it",
                                      w.slot.index, w.pid)
                            _signal(w.pid, signal.SIGKILL)
                    self._stop_deadline = None
            else:
                for w in self.workers:
                    if w.restart_at is not None and now >= w.restart_at:
                        log.info("restarting worker %d", w.slot.index)
                        self._spawn(w)
            time.sleep(POLL_S)

    def _check_ready(self) -> None:
        waiting = {w.ready_fd: w for w in self.workers if not w.ready and w.ready_fd >= 0 and w.exit_code is None}
        if not waiting:
            return
        readable, _, _ = select.select(list(waiting), [], [], 0)
        for fd in readable:
            w = waiting[fd]
            if os.read(fd, 1) == b"1":
                self._mark_ready(w)
                log.info("worker %d (PID %d) serving again", w.slot.index, w.pid)

    def _reap(self, block: bool) -> None:
        """Collect exited workers; while not stopping, schedule their restart."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = next((w for w in self.workers if w.pid == pid and w.exit_code is None), None)
            if w is None:
                continue
            w.exit_code = os.waitstatus_to_exitcode(status)
            self._forget(w)
            if not self.stopping:
                if not w.ready:
                    w.failures += 1
                delay = min(RESTART_MAX_S, RESTART_MIN_S * 2 ** w.failures)
                log.error("worker %d (PID %d) died (exit code %d); restarting it in %.1fs", w.slot.index, pid,
                          w.exit_code, delay)
                w.restart_at = time.monotonic() + delay
            if block:
                return

    def _forget(self, w: _Worker) -> None:
        """A dead worker's pipe and live gauges (the files of its counters stay: they keep counting)."""
        if w.ready_fd >= 0:
            os.close(w.ready_fd)
            w.ready_fd = -1
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(w.pid, self._metrics_dir)

    def _wait_all(self) -> None:
        while any(w.pid and w.exit_code is None for w in self.workers):
            self._reap(block=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _worker_main(settings: Settings, slot: WorkerSlot, ready_fd: int, parent: int) -> int:
    """A forked worker: default signal handlers (the gateway installs its own), SIGTERM when the supervisor
    dies, multiprocess metrics, then one gateway until SIGTERM."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        return 1
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()  # this process's metric values go to the shared files

    from .server import serve

    def ready() -> None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)

    return asyncio.run(serve(settings, slot, ready))


__all__ = ["WorkerSlot", "Supervisor", "run", "reserve_port"]
