"""Real ASGI servers on loopback ports, each in a thread with its own event loop.

In-process, so a test can read the in-memory span exporter and the Prometheus registry the app
writes to; real sockets, so a disconnect is a real TCP close the server has to notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

SERVERS = ("uvicorn-h11", "uvicorn-httptools", "hypercorn", "granian")


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005) -> Any:
    """Poll ``condition`` until it returns something truthy; fail clearly at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)


def advertises_asgi_24_without_raising(kind: str) -> bool:
    """uvicorn 0.28.1-0.32.x claims ASGI spec 2.4 but drops send() after a disconnect silently."""
    if not kind.startswith("uvicorn"):
        return False
    import uvicorn

    major, minor, *_ = (int(p) for p in uvicorn.__version__.split(".")[:2])
    return (major, minor) < (0, 33)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ServerThread:
    def __init__(self, app: Any, kind: str) -> None:
        self.app = app
        self.kind = kind
        self.port = free_port()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"server-{kind}", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start()/stop()
            self._error = exc

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.kind.startswith("uvicorn"):
            import uvicorn

            config = uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                http=self.kind.split("-")[1],
                loop="none",
                lifespan="off",
                log_level="warning",
                timeout_graceful_shutdown=2,
            )
            server = uvicorn.Server(config)
            self._stop = lambda: setattr(server, "should_exit", True)
            await server.serve()
        elif self.kind == "hypercorn":
            from hypercorn.asyncio import serve
            from hypercorn.config import Config

            config = Config()
            config.bind = [f"127.0.0.1:{self.port}"]
            config.graceful_timeout = 2
            logging.getLogger("hypercorn.error").setLevel(logging.WARNING)
            done = asyncio.Event()
            self._stop = done.set
            await serve(self.app, config, shutdown_trigger=done.wait)  # type: ignore[arg-type]
        elif self.kind == "granian":
            from granian.server.embed import Server

            server = Server(self.app, address="127.0.0.1", port=self.port, interface="asgi")
            self._stop = server.stop
            await server.serve()
        else:
            raise ValueError(self.kind)

    def start(self) -> ServerThread:
        self._thread.start()
        wait_for(lambda: self._error is not None or _port_open(self.port), timeout=20)
        if self._error is not None:
            raise RuntimeError(f"{self.kind} failed to start") from self._error
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stop)
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), f"{self.kind} did not stop"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop and return its result (for asyncio introspection)."""
        assert self.loop is not None

        async def runner() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout=10)


@contextlib.contextmanager
def serve(app: Any, kind: str) -> Iterator[ServerThread]:
    server = ServerThread(app, kind).start()
    try:
        yield server
    finally:
        server.stop()


class RawClient:
    """An HTTP/1.1 client on a plain socket, so a test decides exactly when the socket closes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.received = b""

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        send_body: bool = True,
    ) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        hdrs = dict(headers or {})
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs.setdefault("Content-Length", str(len(body)))
        lines += [f"{k}: {v}" for k, v in hdrs.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body if send_body else b""))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{marker!r} not received; got {self.received[-300:]!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(
                    f"connection closed before {marker!r}; got {self.received[-300:]!r}"
                )
            self.received += chunk
        return self.received

    def read_all(self, timeout: float = 10.0) -> bytes:
        self.sock.settimeout(timeout)
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return self.received
            self.received += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
