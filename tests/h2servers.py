"""The ASGI servers that speak HTTP/2, in a thread like tests/servers.py, over h2c or TLS.

Hypercorn (h2c by prior knowledge, TLS with ALPN), Granian (``http="2"``) and uvicorn's own
HTTP/2 (``http="zttp"``, ``http2=True``, uvicorn >= 0.54 with the ``zttp`` parser).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.h2client import Certificate
from tests.servers import ServerThread

H2_SERVERS = ("hypercorn", "granian", "uvicorn-zttp")


def skip_unless_available(kind: str) -> None:
    if kind == "uvicorn-zttp":
        import uvicorn

        version = tuple(int(p) for p in uvicorn.__version__.split(".")[:2])
        missing = None
        if version < (0, 54):
            missing = f"uvicorn {uvicorn.__version__} has no HTTP/2 (0.54 has)"
        elif importlib.util.find_spec("zttp") is None:
            missing = "zttp not installed (uvicorn's HTTP/2 needs it)"
        if missing:
            if IN_CI:
                pytest.fail(missing)
            pytest.skip(missing)


class H2ServerThread(ServerThread):
    def __init__(self, app: Any, kind: str, certificate: Certificate | None) -> None:
        super().__init__(app, kind)
        self.certificate = certificate

    @property
    def url(self) -> str:
        scheme = "https" if self.certificate else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        cert = self.certificate
        if self.kind == "hypercorn":
            from hypercorn.asyncio import serve
            from hypercorn.config import Config

            config = Config()
            config.bind = [f"127.0.0.1:{self.port}"]
            config.graceful_timeout = 2
            if cert is not None:
                config.certfile = str(cert.certfile)
                config.keyfile = str(cert.keyfile)
            logging.getLogger("hypercorn.error").setLevel(logging.WARNING)
            done = asyncio.Event()
            self._stop = done.set
            await serve(self.app, config, shutdown_trigger=done.wait)  # type: ignore[arg-type]
        elif self.kind == "granian":
            from granian.constants import HTTPModes, Interfaces
            from granian.server.embed import Server

            server = Server(
                self.app,
                address="127.0.0.1",
                port=self.port,
                interface=Interfaces.ASGI,
                http=HTTPModes.http2,
                ssl_cert=cert.certfile if cert else None,
                ssl_key=cert.keyfile if cert else None,
            )
            self._stop = server.stop
            await server.serve()
        elif self.kind == "uvicorn-zttp":
            import uvicorn

            config = uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                http="zttp",
                http2=True,
                loop="none",
                lifespan="off",
                log_level="warning",
                timeout_graceful_shutdown=2,
                ssl_certfile=str(cert.certfile) if cert else None,
                ssl_keyfile=str(cert.keyfile) if cert else None,
            )
            server = uvicorn.Server(config)
            self._stop = lambda: setattr(server, "should_exit", True)
            await server.serve()
        else:
            raise ValueError(self.kind)


@contextlib.contextmanager
def serve_h2(
    app: Any, kind: str, certificate: Certificate | None = None
) -> Iterator[H2ServerThread]:
    skip_unless_available(kind)
    server = H2ServerThread(app, kind, certificate)
    server.start()
    try:
        yield server
    finally:
        server.stop()
