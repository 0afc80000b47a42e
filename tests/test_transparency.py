"""The middleware changes nothing the client sees, and leaves nothing behind in the server."""

from __future__ import annotations

import asyncio
import gc
import random
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from otel_disconnect import DisconnectMiddleware
from otel_disconnect.state import RequestState

from .apps import Signals, build_app
from .conftest import Telemetry
from .servers import SERVERS, RawClient, serve, wait_for

REQUESTS = [
    ("GET", "/hello", b""),
    ("GET", "/items/7", b""),
    ("GET", "/headers", b""),
    ("GET", "/missing", b""),
    ("GET", "/stream?chunks=5&interval=0", b""),
    ("GET", "/sse?chunks=3&interval=0", b""),
    ("POST", "/upload", b"z" * 200_000),
]


def _normalise(raw: bytes) -> bytes:
    # Only the Date header may differ between two responses.
    return re.sub(rb"(?im)^date: [^\r\n]*\r\n", b"", raw)


def _fetch_all(port: int) -> list[bytes]:
    out = []
    for method, path, body in REQUESTS:
        with RawClient(port) as client:
            client.request(method, path, body=body, headers={"Connection": "close"})
            out.append(_normalise(client.read_all()))
    return out


@pytest.mark.matrix
@pytest.mark.parametrize("server_kind", SERVERS)
def test_responses_are_byte_identical(server_kind: str, telemetry: Telemetry) -> None:
    with serve(build_app(Signals(), instrument=False), server_kind) as server:
        bare = _fetch_all(server.port)
    app = build_app(Signals(), metrics_path=None, **telemetry.options())
    with serve(app, server_kind) as server:
        instrumented = _fetch_all(server.port)
    assert len(bare) == len(REQUESTS)
    for (method, path, _), a, b in zip(REQUESTS, bare, instrumented, strict=True):
        assert a.startswith(b"HTTP/1.1 "), (path, a[:80])
        assert a == b, f"{method} {path} differs"


def _random_request(port: int, rng: random.Random) -> None:
    kind = rng.choice(["full", "before_response", "mid_stream", "request_body", "immediately"])
    try:
        with RawClient(port) as client:
            if kind == "full":
                client.request("GET", "/stream?chunks=3&interval=0")
                client.read_until(b"0\r\n\r\n")
            elif kind == "before_response":
                client.request("GET", f"/sleep?seconds={rng.uniform(0.001, 0.05):.3f}")
            elif kind == "mid_stream":
                client.request("GET", "/stream?chunks=50&interval=0.001")
                client.read_until(b"chunk 1")
            elif kind == "request_body":
                client.request(
                    "POST", "/upload", headers={"Content-Length": "5000"}, send_body=False
                )
                client.send(b"y" * rng.randint(1, 4000))
            else:
                client.request("GET", "/hello")
            # close() now: wherever the request is, this is where the client leaves.
    except (TimeoutError, ConnectionError):
        pass  # the server may already have closed a cut-short request


def test_no_tasks_or_state_left_after_random_disconnects(telemetry: Telemetry) -> None:
    app = build_app(Signals(), **telemetry.options())
    rng = random.Random(1234)
    seeds = [rng.random() for _ in range(2000)]
    with serve(app, "uvicorn-httptools") as server:
        baseline = server.call(lambda: len(asyncio.all_tasks()))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: _random_request(server.port, random.Random(s)), seeds))
        total = wait_for(
            lambda: (
                sum(
                    s.value
                    for m in telemetry.registry.collect()
                    if m.name == "otel_disconnect_requests"
                    for s in m.samples
                    if s.name.endswith("_total")
                )
                >= 2000
                and telemetry.value("otel_disconnect_inflight_requests", client="connected") == 0
                and telemetry.value("otel_disconnect_inflight_requests", client="disconnected") == 0
            ),
            timeout=60,
        )
        assert total
        wait_for(lambda: server.call(lambda: len(asyncio.all_tasks())) <= baseline, timeout=30)
        disconnects = telemetry.value(
            "otel_disconnect_client_disconnects_total",
            route="/stream",
            method="GET",
            phase="streaming",
            outcome="cancelled",
        )
        assert disconnects > 100  # the random mix really did disconnect mid-stream
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, RequestState)]


def test_no_reference_cycles_per_request() -> None:
    """A cycle per request means a GC pass every few hundred requests: the p99 tail (README:
    Performance)."""

    class Server:
        def __init__(self) -> None:
            self.queue: asyncio.Queue[Any] = asyncio.Queue()
            self.queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})
            self.sent: list[Any] = []

        async def receive(self) -> Any:
            return await self.queue.get()

        async def send(self, message: Any) -> None:
            self.sent.append(message)

    Server.__module__ = "uvicorn.protocols.http.fake"  # driven like uvicorn's, without a task

    def run(app: Any, n: int) -> int:
        async def one() -> None:
            s = Server()
            sent = s.sent
            scope = {
                "type": "http",
                "method": "GET",
                "path": "/hello",
                "raw_path": b"/hello",
                "query_string": b"",
                "headers": [(b"host", b"x")],
                "http_version": "1.1",
                "scheme": "http",
                "server": ("127.0.0.1", 80),
                "client": ("127.0.0.1", 1),
                "root_path": "",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
            }
            await app(scope, s.receive, s.send)
            assert sent[-1]["type"] == "http.response.body"

        async def main() -> int:
            for _ in range(20):  # warm up: build the middleware stack, caches
                await one()
            gc.collect()
            gc.disable()
            try:
                for _ in range(n):
                    await one()
                return gc.collect()
            finally:
                gc.enable()

        return asyncio.run(main())

    bare = run(build_app(Signals(), instrument=False), 300)
    with_middleware = build_app(Signals(), instrument=False)
    with_middleware.add_middleware(DisconnectMiddleware, registry=CollectorRegistry())
    instrumented = run(with_middleware, 300)
    # Whatever FastAPI does, the middleware must add no cycle: one per request would be >= 300.
    assert instrumented <= bare + 30, (bare, instrumented)
