"""An ASGI app served by uvicorn in a thread with its own event loop (the demo runs the gateway,
the LLM simulator and the load generator in one process, each on its own loop)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
import time
from typing import Any


class PortInUse(OSError):
    pass


def check_port(host: str, port: int) -> None:
    """Fail now, with a clear message, rather than inside uvicorn's start-up."""
    with socket.socket() as s:
        # As the server will: connections of an earlier run in TIME_WAIT do not make it busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} on {host} is already in use (choose another with "
                                "--port)") from exc
            raise


class Server:
    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 graceful_s: int = 1) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} on {host} is already in use (choose another "
                                "with --port)") from exc
            raise
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", lifespan="on", loop="asyncio",
                                timeout_graceful_shutdown=graceful_s)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"serve-{self.port}")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.error = exc

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def start(self, timeout: float = 30.0) -> Server:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} failed to start: "
                                   f"{self.error!r}") from self.error
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server on port {self.port} did not start in {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        # Requests still running (zombies, above all) are cancelled at shutdown, on purpose.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        self.server.should_exit = True
        self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()
