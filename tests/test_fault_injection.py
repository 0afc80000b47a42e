"""Faults injected at every step of the request path, in turn: the app never notices.

Each fault point is a function of otel-disconnect on the request path, replaced by one that
raises ``InjectedFault`` on a fraction of its calls. Over thousands of requests with random
disconnect points (in-process, on both read-ahead paths, and on a real uvicorn), whatever raised:

- the server gets exactly the messages the app sends without the middleware, and only the app's
  own exceptions come out (compared request by request with the same app uninstrumented);
- no request hangs (each has a deadline far beyond its normal milliseconds);
- the in-flight gauges return to 0, no ``RequestState`` outlives its request, the loop's tasks and
  the memory otel-disconnect allocated return to their baseline;
- the faults were really hit, and counted in ``otel_disconnect_internal_errors_total``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import otel_disconnect
from otel_disconnect import instrument_app
from otel_disconnect.db import checkouts
from otel_disconnect.db import engine as db_engine
from otel_disconnect.llm import account as llm_account
from otel_disconnect.llm import response_tokens
from otel_disconnect.state import RequestState
from otel_disconnect.telemetry import metrics as metrics_module
from otel_disconnect.telemetry import recorder, spans

from .servers import RawClient, serve, wait_for


class InjectedFault(Exception):
    """Raised by a fault point; never the app's own."""


# (what, owner, attribute): every step of the request path.
FAULT_POINTS: list[tuple[str, Any, str]] = [
    ("start: current span", spans, "current_span"),
    ("start: request state", otel_disconnect.middleware, "RequestState"),
    ("receive: body digest", otel_disconnect.middleware, "BodyDigest"),
    ("read-ahead: watch", otel_disconnect.receive_pump.ReceivePump, "watch"),
    ("read-ahead: close", otel_disconnect.receive_pump.ReceivePump, "close"),
    ("detection: mark", RequestState, "mark_disconnected"),
    ("detection: recorder", recorder.Recorder, "disconnect"),
    ("tokens: observer choice", otel_disconnect.middleware, "observer_for"),
    ("tokens: account", llm_account.TokenAccount, "tally"),
    ("tokens: usage", llm_account.TokenAccount, "usage"),
    ("tokens: span attributes", llm_account.TokenAccount, "span_attributes"),
    ("tokens: record end", llm_account.TokenAccount, "record_end"),
    ("tokens: JSON body observer", response_tokens.ResponseObserver, "feed"),
    ("tokens: event stream observer", response_tokens.SSEObserver, "feed"),
    ("db: connection state", db_engine, "ConnState"),
    ("db: checkout table", checkouts, "add"),
    ("db: request's connections", db_engine.DbRequest, "add"),
    ("db: check-in", db_engine.DbRequest, "remove"),
    ("db: transaction state", db_engine.ConnState, "effective_state"),
    ("db: snapshot at disconnect", db_engine.DbRequest, "on_disconnect"),
    ("db: span attributes", db_engine.DbRequest, "span_attributes"),
    ("db: record end", db_engine.DbRequest, "record_end"),
    ("recorder: span", recorder.Recorder, "write_span"),
    ("recorder: end", recorder.Recorder, "end"),
    ("end: route template", otel_disconnect.middleware, "route_template"),
    ("end: request counter", metrics_module.Metrics, "count_request"),
]


class Faults:
    """Replaces fault points with wrappers that raise on a share of calls, and counts hits."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
        self.monkeypatch = monkeypatch
        self.rng = random.Random(seed)
        self.rate = 0.0
        self.active: set[str] = set()
        self.hits: dict[str, int] = {}
        for what, owner, name in FAULT_POINTS:
            original = getattr(owner, name)  # fails loudly when a fault point was renamed
            self.monkeypatch.setattr(owner, name, self._wrap(what, original))

    def _wrap(self, what: str, original: Any) -> Any:
        faults = self

        if isinstance(original, type):  # a class: fail its construction

            def make(*args: Any, **kwargs: Any) -> Any:
                faults.maybe_raise(what)
                return original(*args, **kwargs)

            return make

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            faults.maybe_raise(what)
            return original(*args, **kwargs)

        return wrapper

    def maybe_raise(self, what: str) -> None:
        if what in self.active and self.rng.random() < self.rate:
            self.hits[what] = self.hits.get(what, 0) + 1
            raise InjectedFault(what)

    def only(self, what: str | None, rate: float) -> None:
        self.active = {w for w, _, _ in FAULT_POINTS} if what is None else {what}
        self.rate = rate

    def off(self) -> None:
        self.active = set()


class _CountingHandler(logging.Handler):
    """Counts the package's log records and keeps none (a kept record's traceback would keep
    the failed request's frames, and its state, alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def quiet_package_log() -> Iterator[_CountingHandler]:
    from otel_disconnect import failsafe

    log = logging.getLogger("otel_disconnect")
    handler = _CountingHandler()
    log.addHandler(handler)
    old_propagate = log.propagate
    log.propagate = False
    logged = set(failsafe._logged)
    failsafe._logged.clear()
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.propagate = old_propagate
        failsafe._logged.clear()
        failsafe._logged.update(logged)


# -- the app -------------------------------------------------------------------------------------

CHUNKS = 6


def _sse_chunk(i: int) -> bytes:
    delta = {"content": f"tok{i}"}
    body = {"object": "chat.completion.chunk", "model": "m", "choices": [{"delta": delta}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def build(engine: Any) -> Starlette:
    async def plain(request: Request) -> Response:
        return JSONResponse({"ok": 1})

    async def completion(request: Request) -> Response:
        leave = request.scope.get("test.leave_in_handler")
        if leave is not None:
            leave()
        await asyncio.sleep(0)
        body = {"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": 5}}
        return JSONResponse(body)

    async def sse(request: Request) -> Response:
        async def events() -> Any:
            for i in range(CHUNKS):
                await asyncio.sleep(0)
                yield _sse_chunk(i)
            yield b'data: {"choices":[],"usage":{"completion_tokens":6}}\n\n'
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    async def fails(request: Request) -> Response:
        await asyncio.sleep(0)
        raise ValueError("the app's own error")

    async def db(request: Request) -> Response:
        async with engine.begin() as conn:
            value = (await conn.execute(text("select 41 + 1"))).scalar()
            leave = request.scope.get("test.leave_in_handler")
            if leave is not None:
                leave()  # the client leaves while the transaction is open
            await asyncio.sleep(0)
        return JSONResponse({"value": value})

    routes = [
        Route("/plain", plain),
        Route("/completion", completion),
        Route("/sse", sse),
        Route("/echo", echo, methods=["POST"]),
        Route("/fails", fails),
        Route("/db", db),
    ]
    return Starlette(routes=routes)


ROUTES = ["/plain", "/completion", "/sse", "/echo", "/fails", "/db"]


@dataclass
class Pair:
    bare: Any
    instrumented: Any
    registry: CollectorRegistry
    engines: tuple[Any, Any]


def make_pair(cancel: bool) -> Pair:
    bare_engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    registry = CollectorRegistry()
    instrumented = instrument_app(
        build(engine),
        engines=[engine],
        metrics_path=None,
        registry=registry,
        tracer_provider=TracerProvider(),
        cancel_on_disconnect=cancel,
    )
    return Pair(build(bare_engine), instrumented, registry, (bare_engine, engine))


# -- an in-process server with a scripted client ---------------------------------------------------


class ServerQueue(asyncio.Queue):  # type: ignore[type-arg]
    """The server's receive: a queue (read ahead without a task, as uvicorn's receive is) that
    repeats ``http.disconnect`` once the client is gone, as uvicorn does."""

    gone = False

    async def get(self) -> Any:
        if self.gone and self.empty():
            return {"type": "http.disconnect"}
        return await super().get()


@dataclass
class Plan:
    route: str
    body_chunks: list[bytes]
    leave_after_chunks: int | None  # the client leaves during the request body
    leave_after_sends: int | None  # ... or after this many messages reached it
    leave_in_handler: bool  # ... or while the handler works (inside its transaction)
    driven: bool  # the server's own receive (driven) or a wrapped one (read in a task)


def random_plan(rng: random.Random, route: str | None = None) -> Plan:
    route = route or rng.choice(ROUTES)
    chunks = [bytes([65 + i]) * rng.randint(1, 3000) for i in range(rng.randint(1, 4))]
    if route != "/echo":
        chunks = [b""]
    point = rng.choice(["stays", "body", "at_once", "sends", "in_handler"])
    leave_chunks = rng.randrange(len(chunks)) if point == "body" and route == "/echo" else None
    leave_sends = {"at_once": 0, "sends": rng.randint(1, CHUNKS + 3)}.get(point)
    in_handler = point == "in_handler" and route in ("/db", "/completion")
    return Plan(route, chunks, leave_chunks, leave_sends, in_handler, rng.random() < 0.5)


async def run_one(app: Any, plan: Plan) -> tuple[list[Any], str | None]:
    """Serve one request; what the server got from the app, and the exception that came out."""
    queue = ServerQueue()
    method = "POST" if plan.route == "/echo" else "GET"
    total = sum(len(c) for c in plan.body_chunks)
    for i, chunk in enumerate(plan.body_chunks):
        if plan.leave_after_chunks is not None and i == plan.leave_after_chunks:
            queue.gone = True
            break
        more = i < len(plan.body_chunks) - 1
        queue.put_nowait({"type": "http.request", "body": chunk, "more_body": more})
    sent: list[Any] = []

    def leave() -> None:
        queue.gone = True
        queue.put_nowait({"type": "http.disconnect"})

    if plan.leave_after_sends == 0:
        leave()

    async def send(message: Any) -> None:
        if queue.gone:
            raise OSError("client gone")  # ASGI 2.4: send() raises once the client left
        sent.append(message)
        if plan.leave_after_sends is not None and len(sent) == plan.leave_after_sends:
            leave()

    async def wrapped_receive() -> Any:  # another middleware's receive: read in a task
        return await queue.get()

    receive = queue.get if plan.driven else wrapped_receive
    headers = [(b"host", b"test")]
    if method == "POST":
        headers.append((b"content-length", str(total).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": plan.route,
        "raw_path": plan.route.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    if plan.leave_in_handler:
        scope["test.leave_in_handler"] = leave
    error: str | None = None
    try:
        # A deadline far beyond the milliseconds a request takes here: reaching it is a hang.
        await asyncio.wait_for(app(scope, receive, send), timeout=20)
    except TimeoutError:
        raise AssertionError(f"request hung: {plan}") from None
    except InjectedFault as exc:
        raise AssertionError(f"an injected fault reached the server: {exc} ({plan})") from None
    except Exception as exc:
        error = type(exc).__name__
    finally:
        if not queue.gone:
            leave()  # the connection closes after the response, as servers report it
    return sent, error


def _live_states() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, RequestState))


def _package_bytes(snapshot: tracemalloc.Snapshot) -> int:
    traced = snapshot.filter_traces([tracemalloc.Filter(True, "*otel_disconnect*")])
    return sum(stat.size for stat in traced.statistics("filename"))


def _inflight(registry: CollectorRegistry) -> tuple[float, float]:
    def value(client: str) -> float:
        found = registry.get_sample_value("otel_disconnect_inflight_requests", {"client": client})
        return found or 0.0

    return value("connected"), value("disconnected")


def _internal_errors(registry: CollectorRegistry) -> float:
    return sum(
        s.value
        for m in registry.collect()
        if m.name == "otel_disconnect_internal_errors"
        for s in m.samples
        if s.name.endswith("_total")
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("cancel", [False, True], ids=["observe", "cancel_on_disconnect"])
def test_faults_at_every_step_in_process(
    cancel: bool, monkeypatch: pytest.MonkeyPatch, quiet_package_log: _CountingHandler
) -> None:
    faults = Faults(monkeypatch, seed=20261201)
    pair = make_pair(cancel)
    rng = random.Random(7)
    # Under cancellation aiosqlite leaves its own terminate tasks behind for a cancelled
    # transaction (the driver's, not ours): the database points run without cancellation.
    routes = [r for r in ROUTES if not (cancel and r == "/db")]
    points = [what for what, _, _ in FAULT_POINTS if not (cancel and what.startswith("db:"))]
    per_point = int(os.environ.get("FAULT_PER_POINT", "48"))

    async def main() -> None:
        baseline_tasks = len(asyncio.all_tasks())
        for i in range(60):  # warm up: middleware stacks, pools, caches
            plan = random_plan(rng, routes[i % len(routes)])
            await run_one(pair.bare, plan)
            await run_one(pair.instrumented, plan)
        tracemalloc.start()
        before = _package_bytes(tracemalloc.take_snapshot())
        compared = 0
        rounds: list[str | None] = [*points, None]
        for what in rounds:  # each point in turn, then all of them at once
            for i in range(per_point):
                plan = random_plan(rng, routes[i % len(routes)])  # every route, each round
                faults.off()
                expected = await run_one(pair.bare, plan)
                faults.only(what, 0.5 if what is not None else 0.03)
                got = await run_one(pair.instrumented, plan)
                faults.off()
                if not cancel:
                    assert got == expected, (what, plan)
                    compared += 1
                else:
                    # Cancellation changes what a disconnected request sends, never what a
                    # client that stays gets, and never lets our own exception out.
                    stays = plan.leave_after_chunks is None and plan.leave_after_sends is None
                    if stays and not plan.leave_in_handler:
                        assert got == expected, (what, plan)
        await asyncio.sleep(0)
        assert _inflight(pair.registry) == (0.0, 0.0)
        wait_deadline = asyncio.get_running_loop().time() + 10
        while len(asyncio.all_tasks()) > baseline_tasks:
            assert asyncio.get_running_loop().time() < wait_deadline, asyncio.all_tasks()
            await asyncio.sleep(0.01)
        gc.collect()
        after = _package_bytes(tracemalloc.take_snapshot())
        tracemalloc.stop()
        # Bounded tables (route cache, logged kinds) may grow a little; per-request state may not:
        # 3,000 requests leaking even one small object each would be > 100 KB.
        assert after - before < 64 * 1024, (before, after)
        if not cancel:
            assert compared == len(rounds) * per_point
        for engine in pair.engines:
            await engine.dispose()

    asyncio.run(main())
    assert _live_states() == 0
    missed = [what for what in points if not faults.hits.get(what)]
    assert not missed, f"fault points never reached: {missed}"
    assert _internal_errors(pair.registry) > 0
    # Logged once per kind, not once per fault.
    assert len(quiet_package_log.messages) <= len({m for m in quiet_package_log.messages}) + 1
    assert len(quiet_package_log.messages) < 40


def _fetch(port: int, path: str, rng: random.Random, leave: str) -> bytes | None:
    """One request on a real socket; the response when the client stays, else None."""
    method = "POST" if path == "/echo" else "GET"
    body = b"x" * 5000 if method == "POST" else b""
    try:
        with RawClient(port) as client:
            if leave == "body" and method == "POST":
                client.request(method, path, headers={"Content-Length": "5000"}, send_body=False)
                client.send(body[: rng.randint(1, 4000)])
                return None
            client.request(method, path, body=body, headers={"Connection": "close"})
            if leave == "before_response":
                return None
            if leave == "mid_stream" and path == "/sse":
                client.read_until(b"tok1")
                return None
            raw = client.read_all()
            return raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else raw
    except (TimeoutError, ConnectionError):
        return None


@pytest.mark.timeout(600)
def test_faults_at_every_step_on_uvicorn(
    monkeypatch: pytest.MonkeyPatch, quiet_package_log: _CountingHandler
) -> None:
    pair = make_pair(cancel=False)
    rng = random.Random(11)
    with serve(pair.bare, "uvicorn-httptools") as server:
        expected = {path: _fetch(server.port, path, rng, "stays") for path in ROUTES}
    faults = Faults(monkeypatch, seed=99)
    with serve(pair.instrumented, "uvicorn-httptools") as server:
        baseline = server.call(lambda: len(asyncio.all_tasks()))
        rounds: list[str | None] = [what for what, _, _ in FAULT_POINTS] + [None]
        served = 0
        for what in rounds:
            faults.only(what, 0.3 if what is not None else 0.03)
            for i in range(18):
                path = ROUTES[i % len(ROUTES)]
                leave = rng.choice(["stays", "stays", "body", "before_response", "mid_stream"])
                got = _fetch(server.port, path, rng, leave)
                if leave == "stays" or (leave == "mid_stream" and path != "/sse"):
                    assert got == expected[path], (what, path)
                served += 1
        faults.off()

        def settled() -> bool:
            return _inflight(pair.registry) == (0.0, 0.0)

        wait_for(settled, timeout=30)
        wait_for(lambda: server.call(lambda: len(asyncio.all_tasks())) <= baseline, timeout=30)
        server.call(lambda: asyncio.gather(*(e.dispose() for e in pair.engines)))
    assert served == len(rounds) * 18
    assert _live_states() == 0
    assert sum(faults.hits.values()) > 50
    assert _internal_errors(pair.registry) > 0
