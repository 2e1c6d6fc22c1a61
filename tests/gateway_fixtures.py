"""An in-process gateway on its own event loop in a daemon thread, for tests that call it with plain
synchronous gRPC (tests/serve and tests/integration share it)."""

from __future__ import annotations

import asyncio
import socket
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """An asyncio event loop in a daemon thread; ``call`` runs a coroutine on it and waits."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class GatewayThread:
    """A :class:`oodguard.serve.server.Gateway` listening on 127.0.0.1 in its own loop thread."""

    def __init__(self, settings, backend_factory=None):
        from oodguard.serve.server import Gateway

        self.loop = LoopThread()
        self.settings = settings

        async def boot():
            backend = backend_factory(settings) if backend_factory else None
            gateway = Gateway(settings, backend=backend)
            try:
                await gateway.start()
            except BaseException:
                await gateway.stop(0)
                raise
            return gateway

        try:
            self.gateway = self.loop.call(boot())
        except BaseException:
            self.loop.close()
            raise
        self.target = f"127.0.0.1:{self.gateway.port}"

    def stop(self, grace: float = 2.0) -> None:
        try:
            self.loop.call(self.gateway.stop(grace))
        finally:
            self.loop.close()
