"""Every shortcut through a dependency's private internals (otel_disconnect/compat/): on the
installed versions the shortcut is what runs (so an upgrade that disables one fails here, in CI,
rather than slowing production down unseen), and its public fallback, forced, gives the same
answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter, Gauge

from otel_disconnect import receive_pump
from otel_disconnect.compat import opentelemetry as otel_compat
from otel_disconnect.compat import prometheus as prom_compat
from otel_disconnect.compat import servers as servers_compat
from otel_disconnect.telemetry import spans
from tests.servers import SERVERS, RawClient, serve

# -- opentelemetry: the current span -----------------------------------------------------------


def test_current_span_takes_the_contextvars_shortcut() -> None:
    assert otel_compat.CURRENT_SPAN_FAST, "the current span is read through the public API"
    assert spans.current_span is otel_compat.current_span
    tracer = TracerProvider().get_tracer("compat")
    with tracer.start_as_current_span("outer") as outer:
        assert otel_compat.current_span() is outer is trace.get_current_span()
        with tracer.start_as_current_span("inner") as inner:
            assert otel_compat.current_span() is inner
        assert otel_compat.current_span() is outer
    # No span: None from the shortcut, INVALID_SPAN from the API; neither is written on.
    assert not spans.recording(otel_compat.current_span())
    assert not spans.recording(trace.get_current_span())


def test_current_span_falls_back_to_the_api_on_another_runtime_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import context as otel_context

    class OtherRuntimeContext:  # what OTEL_PYTHON_CONTEXT could select
        pass

    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", OtherRuntimeContext())
    reader, fast = otel_compat._span_reader()
    assert (reader, fast) == (trace.get_current_span, False)


def test_the_sdk_meter_provider_readers_are_read_not_guessed() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    assert otel_compat.sdk_metric_readers(MeterProvider(metric_readers=[reader])) == [reader], (
        "the SDK's metric readers cannot be read: every SDK MeterProvider counts as exporting"
    )
    assert otel_compat.sdk_metric_readers(MeterProvider()) == []
    assert otel_compat.sdk_metric_readers(object()) is None  # the fallback: not known


# -- opentelemetry: the ASGI receive wrapper ---------------------------------------------------


async def _receive_seen_through_otel_asgi() -> tuple[Any, Any]:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(receive)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def server_receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def server_send(message: Any) -> None:
        pass

    wrapped = OpenTelemetryMiddleware(app, tracer_provider=TracerProvider())
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "http_version": "1.1",
             "query_string": b"", "root_path": ""}
    await wrapped(scope, server_receive, server_send)
    return seen[0], server_receive


def test_the_asgi_instrumentation_receive_wrapper_is_recognised() -> None:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    given, server_receive = asyncio.run(_receive_seen_through_otel_asgi())
    assert given is not server_receive, "the instrumentation no longer wraps receive"
    assert otel_compat.is_asgi_receive_wrapper(given), (
        "OpenTelemetry's receive wrapper is not recognised: the read-ahead would make spans"
    )
    assert otel_compat.unwrap_receive(given) is server_receive
    assert otel_compat.is_otel_middleware(OpenTelemetryMiddleware)


def test_any_other_receive_is_kept() -> None:
    import functools

    async def server_receive() -> dict[str, Any]:
        return {}

    @functools.wraps(server_receive)
    async def limit_body() -> dict[str, Any]:  # another middleware's wrapper: may change messages
        return await server_receive()

    assert otel_compat.unwrap_receive(limit_body) is limit_body
    assert otel_compat.unwrap_receive(server_receive) is server_receive


# -- prometheus-client: counter children ------------------------------------------------------


def test_counter_and_gauge_children_take_the_value_shortcut() -> None:
    registry = CollectorRegistry()
    counter = Counter("compat_requests", "", ["route"], registry=registry)
    gauge = Gauge("compat_inflight", "", registry=registry)
    inc = prom_compat.fast_inc(counter.labels("/a"))
    up, down = prom_compat.fast_inc(gauge), prom_compat.fast_dec(gauge)
    assert prom_compat.is_fast(inc) and prom_compat.is_fast(up) and prom_compat.is_fast(down), (
        "prometheus-client children no longer have _value.inc: the public inc() runs"
    )
    for _ in range(3):
        inc()
        up()
    down()
    assert registry.get_sample_value("compat_requests_total", {"route": "/a"}) == 3
    assert registry.get_sample_value("compat_inflight") == 2


def test_children_without_the_private_value_use_the_public_calls() -> None:
    class Child:  # another layout of a child: public inc/dec only
        def __init__(self) -> None:
            self.value = 0

        def inc(self) -> None:
            self.value += 1

        def dec(self) -> None:
            self.value -= 1

    child = Child()
    inc, dec = prom_compat.fast_inc(child), prom_compat.fast_dec(child)
    assert not prom_compat.is_fast(inc) and not prom_compat.is_fast(dec)
    inc()
    inc()
    dec()
    assert child.value == 1


# -- the servers' own receive: stepped by hand ------------------------------------------------


def _capturing_app(seen: list[bool]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            while scope["type"] == "lifespan":
                kind = (await receive())["type"]  # lifespan.startup, then lifespan.shutdown
                await send({"type": kind + ".complete"})
                if kind == "lifespan.shutdown":
                    return
            return
        seen.append(servers_compat.drivable(receive))
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@pytest.mark.parametrize("kind", SERVERS)
def test_every_supported_server_receive_is_stepped_without_a_task(kind: str) -> None:
    seen: list[bool] = []
    with serve(_capturing_app(seen), kind) as server, RawClient(server.port) as client:
        client.request("GET", "/")
        client.read_until(b"ok")
    assert seen == [True], f"{kind}'s receive is read in a task, not stepped by hand"


@pytest.fixture
def no_direct_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(receive_pump, "drivable", lambda receive: False)
    yield


@pytest.mark.parametrize("kind", ["uvicorn-httptools", "hypercorn"])
def test_the_task_fallback_still_detects_a_hang_up(
    kind: str, no_direct_read: None, telemetry: Any
) -> None:
    from tests.apps import Signals, build_app
    from tests.servers import wait_for

    signals = Signals()
    app = build_app(signals, cancel_on_disconnect=True, **telemetry.options())
    with serve(app, kind) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/work?seconds=30")
            signals.wait("work.started")
        wait_for(
            lambda: telemetry.value(
                "otel_disconnect_client_disconnects_total",
                route="/work", method="GET", phase="before_response", outcome="cancelled",
            ) == 1,
            timeout=30,
        )
    assert "work.finished" not in signals.values


# -- SQLAlchemy: the pool entry behind a connection --------------------------------------------


def _transactions(statements: int) -> list[str]:
    """Run begin / statement / commit on an instrumented SQLite engine inside a request, and
    return the transaction states the hooks recorded on the way."""
    from sqlalchemy import create_engine, text

    from otel_disconnect.context import reset_current, set_current
    from otel_disconnect.db import engine as db_engine
    from otel_disconnect.state import RequestState

    engine = create_engine("sqlite://")
    db_engine.instrument_engine(engine, registry=CollectorRegistry())
    token = set_current(RequestState({"type": "http", "method": "GET", "path": "/"}))
    states = []
    try:
        with engine.connect() as conn:
            for _ in range(statements):
                with conn.begin():
                    conn.execute(text("select 1"))
                    found = db_engine.conn_state(conn.connection)
                    assert found is not None
                    states.append(found.effective_state())
                states.append(found.effective_state())
    finally:
        reset_current(token)
        db_engine.uninstrument_engine(engine)
        engine.dispose()
    return states


def test_sqlalchemy_takes_the_pool_entry_shortcut() -> None:
    from otel_disconnect.compat import sqlalchemy as sa_compat
    from otel_disconnect.db import engine as db_engine

    assert sa_compat.FAST, "SQLAlchemy's private layout changed: the public path runs"
    assert db_engine.entry_info is sa_compat.entry_info
    assert db_engine.context_entry_info is sa_compat.context_entry_info
    assert _transactions(3) == ["idle_in_transaction", "none"] * 3


def test_sqlalchemy_public_fallback_gives_the_same_states(monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_disconnect.compat import sqlalchemy as sa_compat
    from otel_disconnect.db import engine as db_engine

    fast = _transactions(3)
    monkeypatch.setattr(db_engine, "entry_info", sa_compat._public_entry_info)
    monkeypatch.setattr(db_engine, "context_entry_info", sa_compat._public_context_entry_info)
    assert _transactions(3) == fast
