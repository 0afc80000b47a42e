"""The five ways a request leaves the database behind, on real servers, sockets and PostgreSQL.

Each scenario asserts the span, the metrics and what PostgreSQL itself shows in pg_stat_activity.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from otel_disconnect.db.pg_activity import PgActivityCollector

from ..apps import Signals
from ..conftest import Telemetry
from ..servers import RawClient, ServerThread, serve, wait_for
from .apps import build_db_app
from .conftest import ASYNC_DRIVERS, Activity, make_engine, rows_of

OUTCOMES = ("clean", "rolled_back", "terminated", "invalidated")


def _span(telemetry: Telemetry, route: str) -> Any:
    def find() -> Any:
        for span in telemetry.server_spans():
            if span.attributes and span.attributes.get("http.route") == route:
                return span
        return None

    return wait_for(find)


def _events(span: Any, name: str) -> list[Any]:
    return [e for e in span.events if e.name == name]


def _checkins(telemetry: Telemetry) -> dict[str, float]:
    return {o: telemetry.value("otel_disconnect_db_checkins_total", outcome=o) for o in OUTCOMES}


def _interrupted(telemetry: Telemetry, route: str, state: str) -> float:
    return telemetry.value(
        "otel_disconnect_db_transactions_interrupted_total", route=route, state=state
    )


def _left_open(telemetry: Telemetry, route: str, state: str) -> float:
    return telemetry.value(
        "otel_disconnect_db_connections_left_open_total", route=route, state=state
    )


def _orphans(telemetry: Telemetry, app_name: str, owner: str) -> float:
    return telemetry.value(
        "otel_disconnect_pg_orphaned_transactions",
        datname="postgres", application_name=app_name, owner=owner,
    )


def _trace_id(span: Any) -> str:
    return format(span.context.trace_id, "032x")


def _on_loop(server: ServerThread, coro: Any) -> Any:
    assert server.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, server.loop).result(timeout=10)


@pytest.fixture(params=ASYNC_DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine(
    pg_url: str, driver: str, app_name: str, activity: Activity, pg_table: str
) -> Iterator[Any]:
    engine = make_engine(pg_url, driver, app_name)
    yield engine
    activity.terminate(app_name)
    engine.sync_engine.dispose(close=False)


@pytest.fixture
def collector(pg_url: str, telemetry: Telemetry) -> Iterator[PgActivityCollector]:
    found = PgActivityCollector(pg_url, registry=telemetry.registry)
    yield found
    found.close()


def test_1_stream_cancelled_inside_session_begin(
    engine: Any, app_name: str, activity: Activity, telemetry: Telemetry
) -> None:
    signals = Signals()
    app = build_db_app(signals, engine, **telemetry.options())
    with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
        client.request("GET", "/tx-stream")
        client.read_until(b"first\n")
        pid = signals.wait("tx_stream.in_tx")
        assert activity.backend(pid)["state"] == "idle in transaction"
        client.close()
        span = _span(telemetry, "/tx-stream")
        wait_for(lambda: sum(_checkins(telemetry).values()) == 1)

    attrs = span.attributes
    assert attrs["disconnect.outcome"] == "cancelled"
    assert attrs["disconnect.db.transaction_state"] == "idle_in_transaction"
    assert 0 < attrs["disconnect.db.transaction_age_s"] < 10
    assert list(attrs["disconnect.db.backend_pids"]) == [pid]
    assert attrs["disconnect.db.left_open"] == 0
    [event] = _events(span, "db.transaction.interrupted")
    assert event.attributes["disconnect.db.backend_pid"] == pid
    assert event.attributes["disconnect.db.statement_running"] is False
    assert _interrupted(telemetry, "/tx-stream", "idle_in_transaction") == 1
    assert _left_open(telemetry, "/tx-stream", "idle_in_transaction") == 0
    # The cancellation also interrupts session.begin()'s own rollback, so SQLAlchemy invalidates
    # the connection: the backend goes away and PostgreSQL rolls the transaction back.
    assert _checkins(telemetry) == {**dict.fromkeys(OUTCOMES, 0.0), "invalidated": 1.0}
    wait_for(lambda: activity.backend(pid) is None)
    assert rows_of(activity, app_name) == 0
    assert activity.states(app_name) in ([], ["idle"])


def test_2_transaction_open_across_slow_upstream(  # noqa: PLR0917
    engine: Any, app_name: str, activity: Activity, telemetry: Telemetry,
    collector: PgActivityCollector, caplog: pytest.LogCaptureFixture,
) -> None:
    signals = Signals()
    app = build_db_app(signals, engine, **telemetry.options())
    caplog.set_level(logging.WARNING, logger="otel_disconnect.pg")
    with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
        client.request("GET", "/slow-upstream")
        pid = signals.wait("upstream.in_tx")
        client.close()
        wait_for(lambda: _interrupted(telemetry, "/slow-upstream", "idle_in_transaction") == 1)
        # The handler still waits for its upstream, holding the transaction open for nobody.
        backend = activity.backend(pid)
        assert backend["state"] == "idle in transaction"
        assert backend["xact_age"] > 0
        assert _orphans(telemetry, app_name, "disconnected") == 1
        assert _orphans(telemetry, app_name, "ended") == 0
        assert telemetry.value(
            "otel_disconnect_pg_idle_in_transaction_max_seconds",
            datname="postgres", application_name=app_name,
        ) > 0
        assert server.loop is not None
        server.loop.call_soon_threadsafe(signals.values["upstream.event"].set)
        span = _span(telemetry, "/slow-upstream")
        wait_for(lambda: _checkins(telemetry)["clean"] == 1)

    attrs = span.attributes
    assert attrs["disconnect.outcome"] == "completed"
    assert attrs["disconnect.db.transaction_state"] == "idle_in_transaction"
    assert attrs["disconnect.db.transaction_age_s"] > 0
    assert list(attrs["disconnect.db.backend_pids"]) == [pid]
    assert attrs["disconnect.db.left_open"] == 0
    assert len(_events(span, "db.transaction.interrupted")) == 1
    [orphaned] = _events(span, "db.transaction.orphaned")  # the span was still recording
    assert orphaned.attributes["disconnect.db.orphan_owner"] == "disconnected"
    assert orphaned.attributes["disconnect.db.backend_pid"] == pid
    [line] = [m for m in (r.getMessage() for r in caplog.records) if "orphaned" in m]
    assert _trace_id(span) in line and f"pid {pid}" in line
    assert rows_of(activity, app_name) == 0  # the handler wrote nothing; it committed its SELECT
    assert activity.backend(pid)["state"] == "idle"  # back in the pool, transaction over
    assert _orphans(telemetry, app_name, "disconnected") == 0


def test_3_connection_leaked_by_cancelled_stream(  # noqa: PLR0917
    engine: Any, app_name: str, activity: Activity, telemetry: Telemetry,
    collector: PgActivityCollector, caplog: pytest.LogCaptureFixture,
) -> None:
    signals = Signals()
    app = build_db_app(signals, engine, **telemetry.options())
    caplog.set_level(logging.WARNING, logger="otel_disconnect.pg")
    with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
        client.request("GET", "/leak-stream")
        client.read_until(b"first\n")
        pid = signals.wait("leak.in_tx")
        client.close()
        span = _span(telemetry, "/leak-stream")
        assert span.attributes["disconnect.db.left_open"] == 1
        assert _left_open(telemetry, "/leak-stream", "idle_in_transaction") == 1
        # The request is over; its connection is still idle in transaction.
        assert activity.backend(pid)["state"] == "idle in transaction"
        assert _orphans(telemetry, app_name, "ended") == 1
        assert _orphans(telemetry, app_name, "disconnected") == 0

        def idle_max() -> float:
            return telemetry.value(
                "otel_disconnect_pg_idle_in_transaction_max_seconds",
                datname="postgres", application_name=app_name,
            )

        first = idle_max()
        wait_for(lambda: idle_max() > first + 0.05)  # the age keeps growing
        [line] = [m for m in (r.getMessage() for r in caplog.records) if "orphaned" in m]
        assert _trace_id(span) in line and "ended" in line
        assert sum(_checkins(telemetry).values()) == 0  # never returned
        _on_loop(server, app.state.leaked[0].close())
        assert _checkins(telemetry)["clean"] == 1  # Connection.close() rolled back itself
        assert _orphans(telemetry, app_name, "ended") == 0
        assert activity.backend(pid)["state"] == "idle"

    attrs = span.attributes
    assert attrs["disconnect.outcome"] == "cancelled"
    assert attrs["disconnect.db.transaction_state"] == "idle_in_transaction"
    assert list(attrs["disconnect.db.backend_pids"]) == [pid]
    assert _interrupted(telemetry, "/leak-stream", "idle_in_transaction") == 1


def test_4_cancelled_during_a_running_statement(
    engine: Any, app_name: str, activity: Activity, telemetry: Telemetry
) -> None:
    signals = Signals()
    app = build_db_app(signals, engine, **telemetry.options())
    with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
        client.request("GET", "/running-stream")
        client.read_until(b"first\n")
        pid = signals.wait("running.pid")
        wait_for(lambda: "pg_sleep" in ((activity.backend(pid) or {}).get("query") or "")
                 and activity.backend(pid)["state"] == "active")
        client.close()
        span = _span(telemetry, "/running-stream")
        wait_for(lambda: sum(_checkins(telemetry).values()) == 1)
        after = activity.backend(pid)

    attrs = span.attributes
    assert attrs["disconnect.db.transaction_state"] == "active"
    [event] = _events(span, "db.transaction.interrupted")
    assert event.attributes["disconnect.db.statement_running"] is True
    assert event.attributes["disconnect.db.transaction_state"] == "active"
    assert _interrupted(telemetry, "/running-stream", "active") == 1
    assert _checkins(telemetry)["invalidated"] == 1
    # SQLAlchemy dropped the connection, but PostgreSQL notices a vanished client only when it
    # next writes to it: the backend keeps running the statement for nobody.
    assert after is not None and after["state"] == "active" and "pg_sleep" in after["query"]
    assert list(attrs["disconnect.db.backend_pids"]) == [pid]


def test_5_sync_session_in_threadpool_endpoint(
    pg_url: str, app_name: str, activity: Activity, telemetry: Telemetry, pg_table: str
) -> None:
    sync_engine = make_engine(pg_url, "psycopg", app_name, sync=True)
    signals = Signals()
    app = build_db_app(signals, sync_engine=sync_engine, **telemetry.options())
    try:
        with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
            client.request("GET", "/sync-tx")
            pid = signals.wait("sync.in_tx")
            client.close()
            wait_for(lambda: _interrupted(telemetry, "/sync-tx", "idle_in_transaction") == 1)
            assert activity.backend(pid)["state"] == "idle in transaction"
            signals.set("sync.release")
            span = _span(telemetry, "/sync-tx")
            wait_for(lambda: _checkins(telemetry)["clean"] == 1)
    finally:
        sync_engine.dispose()

    attrs = span.attributes
    assert attrs["disconnect.outcome"] == "completed"
    assert attrs["disconnect.db.transaction_state"] == "idle_in_transaction"
    assert list(attrs["disconnect.db.backend_pids"]) == [pid]
    assert attrs["disconnect.db.left_open"] == 0
    assert rows_of(activity, app_name) == 1  # nobody read the answer, but the work committed
