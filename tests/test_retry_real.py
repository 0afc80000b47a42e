"""Retry-after-disconnect on real servers, over HTTP/2 and behind a real nginx.

Never flagged: the neighbours of a reset HTTP/2 stream, and readers that began before another
client hung up, even when they finish long after it. Always flagged: a real retry (the same
request from the same client, or the same ``Idempotency-Key``) that starts after the disconnect.
Behind nginx with its forwarding header trusted, two clients with the same body are told apart.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from otel_disconnect import instrument_app

from .conftest import Telemetry
from .h2client import H2Client
from .h2servers import serve_h2
from .proxies import run_proxy
from .servers import ServerThread, wait_for


class Gate:
    """Held streams send their first chunk, then wait until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = threading.Event()

    async def wait(self) -> None:
        # The test thread opens it: a threading.Event, polled (an asyncio.Event is one loop's).
        while not self.opened.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def build_app(telemetry: Telemetry, gate: Gate) -> FastAPI:
    app = FastAPI()

    async def chunks(hold: bool) -> Any:
        yield b"first\n"
        if hold:
            await gate.wait()
        yield b"last\n"

    @app.get("/stream")
    async def stream(hold: int = 1) -> StreamingResponse:
        return StreamingResponse(chunks(bool(hold)), media_type="text/plain")

    @app.post("/generate")
    async def generate(request: Request, hold: int = 0) -> StreamingResponse:
        await request.body()
        return StreamingResponse(chunks(bool(hold)), media_type="text/plain")

    instrument_app(app, metrics_path=None, **telemetry.options())
    return app


def _retries(telemetry: Telemetry, route: str) -> float:
    return telemetry.value("otel_disconnect_retries_after_disconnect_total", route=route)


def _disconnects(telemetry: Telemetry) -> float:
    """Premature disconnects detected so far (in flight as zombies, or ended)."""
    ended = sum(
        sample.value
        for family in telemetry.registry.collect()
        if family.name == "otel_disconnect_client_disconnects"
        for sample in family.samples
        if sample.name.endswith("_total")
    )
    return ended + telemetry.value("otel_disconnect_inflight_requests", client="disconnected")


def _requests(telemetry: Telemetry, route: str, method: str) -> float:
    return telemetry.value("otel_disconnect_requests_total", route=route, method=method)


# -- HTTP/2: the neighbours of a reset stream ---------------------------------------------------


@pytest.mark.parametrize("kind", ["hypercorn", "granian", "uvicorn-zttp"])
def test_http2_neighbours_of_a_reset_stream_are_not_retries(
    kind: str, telemetry: Telemetry
) -> None:
    gate = Gate()
    with serve_h2(build_app(telemetry, gate), kind) as server, H2Client(server.port) as h2:
        streams = [h2.request("GET", "/stream") for _ in range(3)]
        for stream_id in streams:
            h2.read_until(stream_id, b"first\n")
        h2.reset(streams[0])
        wait_for(lambda: _disconnects(telemetry) == 1)
        gate.opened.set()  # the neighbours read to the end, after the disconnect was seen
        for stream_id in streams[1:]:
            assert h2.response(stream_id).body == b"first\nlast\n"
        wait_for(lambda: _requests(telemetry, "/stream", "GET") == 3)
        assert _retries(telemetry, "/stream") == 0
        # The same request from the same client (this connection), started after the reset.
        retry = h2.request("GET", "/stream")
        assert h2.response(retry).body == b"first\nlast\n"
        wait_for(lambda: _requests(telemetry, "/stream", "GET") == 4)
        assert _retries(telemetry, "/stream") == 1


# -- HTTP/1.1: readers that began before another client hung up ---------------------------------


class Client:
    """An HTTP/1.1 client on a plain socket, from a chosen loopback source address."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.received = b""

    def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        if method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.received:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed before {marker!r}: {self.received!r}"
            self.received += chunk
        return self.received

    def read_to_end(self) -> bytes:
        """Until the server closes (``Connection: close``): the response is complete."""
        while chunk := self.sock.recv(65536):
            self.received += chunk
        return self.received

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("kind", ["uvicorn-httptools", "hypercorn", "granian"])
def test_readers_that_began_before_a_hang_up_are_not_retries(
    kind: str, telemetry: Telemetry
) -> None:
    gate = Gate()
    server = ServerThread(build_app(telemetry, gate), kind).start()
    try:
        readers = [Client(server.port) for _ in range(4)]
        for reader in readers:
            reader.request("GET", "/stream")
        for reader in readers:
            reader.read_until(b"first\n")
        readers[0].close()  # one client hangs up; the others, from the same address, stay
        wait_for(lambda: _disconnects(telemetry) == 1)
        gate.opened.set()
        for reader in readers[1:]:
            reader.read_until(b"last\n")
            reader.close()
        wait_for(lambda: _requests(telemetry, "/stream", "GET") == 4)
        assert _retries(telemetry, "/stream") == 0
        again = Client(server.port)
        again.request("GET", "/stream")
        again.read_until(b"last\n")
        again.close()
        wait_for(lambda: _requests(telemetry, "/stream", "GET") == 5)
        assert _retries(telemetry, "/stream") == 1
    finally:
        server.stop()


# -- behind nginx: the client is not the proxy --------------------------------------------------


class ProxiedUvicorn(ServerThread):
    """uvicorn trusting the forwarding headers of the proxy at 127.0.0.1 only (its default,
    spelled out: ``--proxy-headers --forwarded-allow-ips=127.0.0.1``)."""

    async def _serve(self) -> None:
        import uvicorn

        self.loop = asyncio.get_running_loop()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            http="httptools",
            loop="none",
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=2,
            proxy_headers=True,
            forwarded_allow_ips="127.0.0.1",
        )
        server = uvicorn.Server(config)
        self._stop = lambda: setattr(server, "should_exit", True)
        await server.serve()


@pytest.fixture
def behind_nginx(telemetry: Telemetry) -> Iterator[Callable[[bool], tuple[int, Gate]]]:
    stack: list[Any] = []

    def start(forward: bool) -> tuple[int, Gate]:
        gate = Gate()
        server = ProxiedUvicorn(build_app(telemetry, gate), "uvicorn-httptools").start()
        stack.append(server.stop)
        extra = ["proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"] if forward else []
        proxy = run_proxy("nginx", server.port, settings="streaming", extra=extra)
        port = proxy.__enter__().port
        stack.append(lambda: proxy.__exit__(None, None, None))
        return port, gate

    yield start
    for stop in reversed(stack):
        stop()


BODY = b'{"prompt": "the same prompt"}'


def _hang_up(port: int, source: str, **headers: str) -> None:
    client = Client(port, source)
    client.request("POST", "/generate?hold=1", BODY, **headers)
    client.read_until(b"first\n")
    client.close()


def _complete(port: int, source: str, **headers: str) -> None:
    """Read the whole response: the retry check runs before the final body is sent."""
    client = Client(port, source)
    client.request("POST", "/generate", BODY, **headers)
    assert client.read_to_end().endswith(b"last\n\r\n0\r\n\r\n")
    client.close()


@pytest.mark.parametrize("forward", [True, False], ids=["forwarded-trusted", "no-forwarding"])
def test_behind_nginx_two_clients_with_the_same_body(
    forward: bool, behind_nginx: Callable[[bool], tuple[int, Gate]], telemetry: Telemetry
) -> None:
    port, gate = behind_nginx(forward)
    _hang_up(port, "127.0.0.2")  # client A gives up
    wait_for(lambda: _disconnects(telemetry) == 1)
    _complete(port, "127.0.0.3")  # client B, the same body
    if forward:
        assert _retries(telemetry, "/generate") == 0  # B is not A's retry
    else:
        # Without forwarding headers every request comes from nginx's address: B counts as A's
        # retry (the README says what the figure means then).
        assert _retries(telemetry, "/generate") == 1
    before = _retries(telemetry, "/generate")
    _complete(port, "127.0.0.2")  # A retries
    assert _retries(telemetry, "/generate") == before + 1
    if forward:
        # The Idempotency-Key wins over the address: C's key repeated by D is a retry.
        _hang_up(port, "127.0.0.4", Idempotency_Key="order-7")
        wait_for(lambda: _disconnects(telemetry) == 2)
        _complete(port, "127.0.0.5", Idempotency_Key="order-7")
        assert _retries(telemetry, "/generate") == before + 2
    gate.opened.set()
    wait_for(
        lambda: telemetry.value("otel_disconnect_inflight_requests", client="disconnected") == 0
    )
