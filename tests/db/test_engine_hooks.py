"""The engine hooks without a server: transaction states, check-in outcomes, fail-open, sqlite."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from otel_disconnect.db import checkouts
from otel_disconnect.db.engine import KEY, instrument_engine, is_instrumented, uninstrument_engine
from otel_disconnect.state import RequestState, _current

OUTCOMES = ("clean", "rolled_back", "terminated", "invalidated")


def _checkins(registry: CollectorRegistry) -> dict[str, float]:
    return {
        o: registry.get_sample_value("otel_disconnect_db_checkins_total", {"outcome": o}) or 0.0
        for o in OUTCOMES
    }


def _request() -> tuple[RequestState, Any]:
    state = RequestState({"type": "http", "method": "GET"})
    return state, _current.set(state)


def _states(state: RequestState) -> list[str]:
    return [c.effective_state() for c in state.extras[KEY].held] if state.extras else []


def test_sqlite_transaction_states_and_checkins() -> None:
    registry = CollectorRegistry()
    engine = instrument_engine(sqlalchemy.create_engine("sqlite://"), registry=registry)
    state, token = _request()
    try:
        with engine.connect() as conn:
            assert _states(state) == ["none"]
            conn.execute(text("SELECT 1"))  # autobegin
            assert _states(state) == ["idle_in_transaction"]
            held = state.extras[KEY].held[0]
            assert held.pid is None and held.db_system == "sqlite"
            conn.commit()
            assert _states(state) == ["none"]
            conn.begin()
            conn.rollback()
            assert _states(state) == ["none"]
        assert _states(state) == []
        assert _checkins(registry) == {**dict.fromkeys(OUTCOMES, 0.0), "clean": 1.0}
        # A raw DBAPI transaction the pool has to roll back on return.
        raw = engine.raw_connection()
        record_conn = checkouts.get(id(raw._connection_record))
        assert record_conn is not None
        record_conn.tx = "idle_in_transaction"  # raw connections have no Connection events
        raw.close()
        assert _checkins(registry)["rolled_back"] == 1
        with engine.connect() as conn:
            conn.invalidate()
        assert _checkins(registry)["invalidated"] == 1
    finally:
        _current.reset(token)
        engine.dispose()


def test_statement_running_is_active_and_errors_clear_it() -> None:
    engine = sqlalchemy.create_engine("sqlite://")
    instrument_engine(engine, registry=CollectorRegistry())
    seen: list[list[str]] = []
    state, token = _request()

    def during(conn: Any, *args: Any) -> None:
        seen.append(_states(state))

    sqlalchemy.event.listen(engine, "before_cursor_execute", during)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            with pytest.raises(sqlalchemy.exc.OperationalError):
                conn.execute(text("SELECT * FROM no_such_table"))
            assert _states(state) == ["idle_in_transaction"]
        assert seen == [["active"], ["active"]]
    finally:
        _current.reset(token)
        engine.dispose()


def test_instrumenting_twice_changes_nothing_and_can_be_undone() -> None:
    registry = CollectorRegistry()
    engine = sqlalchemy.create_engine("sqlite://")
    instrument_engine(engine, registry=registry)
    instrument_engine(engine, registry=registry)
    with engine.connect():
        pass
    assert _checkins(registry)["clean"] == 1
    uninstrument_engine(engine)
    assert not is_instrumented(engine)
    with engine.connect():
        pass
    assert _checkins(registry)["clean"] == 1
    engine.dispose()


def test_outside_a_request_only_checkins_are_counted() -> None:
    registry = CollectorRegistry()
    engine = instrument_engine(sqlalchemy.create_engine("sqlite://"), registry=registry)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert _checkins(registry)["clean"] == 1
    engine.dispose()


def test_async_sqlite_engine() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    registry = CollectorRegistry()

    async def main() -> list[str]:
        engine = instrument_engine(create_async_engine("sqlite+aiosqlite://"), registry=registry)
        state, token = _request()
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                return _states(state)
        finally:
            _current.reset(token)
            await engine.dispose()

    assert asyncio.run(main()) == ["idle_in_transaction"]
    assert _checkins(registry)["clean"] == 1


def test_a_failing_hook_never_reaches_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    engine = instrument_engine(sqlalchemy.create_engine("sqlite://"), registry=registry)

    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(checkouts, "add", broken)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 42")).scalar_one() == 42
    assert registry.get_sample_value(
        "otel_disconnect_internal_errors_total", {"where": "db_checkout"}
    ) == 1
    engine.dispose()


def test_auto_instrumentor_instruments_engines_created_after_start() -> None:
    from otel_disconnect import DisconnectInstrumentor

    registry = CollectorRegistry()
    instrumentor = DisconnectInstrumentor()
    instrumentor.instrument(registry=registry)
    try:
        from sqlalchemy import create_engine  # looked up after instrument(), like an app would
        from sqlalchemy.ext.asyncio import create_async_engine

        sync = create_engine("sqlite://")
        async_engine = create_async_engine("sqlite+aiosqlite://")
        assert is_instrumented(sync) and is_instrumented(async_engine)
        with sync.connect():
            pass
        assert _checkins(registry)["clean"] == 1
    finally:
        instrumentor.uninstrument()
    assert not is_instrumented(sqlalchemy.create_engine("sqlite://"))
    assert not getattr(sqlalchemy.create_engine, "__wrapped_by_otel_disconnect__", False)
