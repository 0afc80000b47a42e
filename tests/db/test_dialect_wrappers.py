"""The engine hooks on PostgreSQL paths that end or nest transactions: savepoints, two-phase
commit, a backend terminated mid-transaction; on psycopg (sync) and the asyncio drivers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from otel_disconnect.context import reset_current, set_current
from otel_disconnect.db.engine import KEY, ConnState, instrument_engine
from otel_disconnect.state import RequestState

from ..servers import wait_for
from .conftest import ASYNC_DRIVERS, Activity, make_engine, rows_of

OUTCOMES = ("clean", "rolled_back", "terminated", "invalidated")
INSERT = text("INSERT INTO od_items (app) VALUES (current_setting('application_name'))")


@dataclass
class Db:
    url: str
    app_name: str
    activity: Activity
    state: RequestState  # the current request's
    registry: CollectorRegistry

    def engine(self, driver: str, *, sync: bool = False) -> Any:
        return instrument_engine(
            make_engine(self.url, driver, self.app_name, sync=sync), registry=self.registry
        )


@pytest.fixture
def db(pg_url: str, app_name: str, activity: Activity, pg_table: str) -> Iterator[Db]:
    state = RequestState({"type": "http", "method": "GET"})
    token = set_current(state)
    yield Db(pg_url, app_name, activity, state, CollectorRegistry())
    reset_current(token)
    activity.terminate(app_name)


def _states(state: RequestState) -> list[str]:
    return [c.effective_state() for c in state.extras[KEY].held] if state.extras else []


def _held(state: RequestState) -> ConnState:
    [held] = state.extras[KEY].held
    return held


def _checkins(registry: CollectorRegistry) -> dict[str, float]:
    return {
        o: registry.get_sample_value("otel_disconnect_db_checkins_total", {"outcome": o}) or 0.0
        for o in OUTCOMES
    }


def _internal_errors(registry: CollectorRegistry) -> float:
    return sum(
        s.value for m in registry.collect() for s in m.samples
        if s.name == "otel_disconnect_internal_errors_total"
    )


def _terminate(activity: Activity, pid: int) -> None:
    activity.conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: activity.backend(pid) is None)


# -- savepoints --------------------------------------------------------------------------------


def test_savepoints_leave_the_transaction_state_alone(db: Db) -> None:
    engine = db.engine("psycopg", sync=True)
    try:
        with engine.connect() as conn:
            conn.execute(INSERT)
            held = _held(db.state)
            start = held.tx_start
            assert start is not None
            nested = conn.begin_nested()
            conn.execute(INSERT)
            nested.rollback()
            assert _states(db.state) == ["idle_in_transaction"] and held.tx_start == start
            with conn.begin_nested():
                conn.execute(INSERT)
            assert _states(db.state) == ["idle_in_transaction"] and held.tx_start == start
            nested = conn.begin_nested()
            with pytest.raises(sqlalchemy.exc.ProgrammingError):
                conn.execute(text("SELECT * FROM no_such_table"))
            nested.rollback()  # the failed statement is undone; the transaction goes on
            assert _states(db.state) == ["idle_in_transaction"] and not held.running
            assert db.activity.backend(held.pid)["state"] == "idle in transaction"  # type: ignore[arg-type,index]
            conn.commit()
            assert _states(db.state) == ["none"] and held.tx_start is None
        assert rows_of(db.activity, db.app_name) == 2
        assert _checkins(db.registry) == {**dict.fromkeys(OUTCOMES, 0.0), "clean": 1.0}
        assert _internal_errors(db.registry) == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_savepoints_on_the_asyncio_drivers(db: Db, driver: str) -> None:
    async def main() -> None:
        engine = db.engine(driver)
        try:
            async with engine.connect() as conn:
                await conn.execute(INSERT)
                held = _held(db.state)
                start = held.tx_start
                nested = await conn.begin_nested()
                await conn.execute(INSERT)
                await nested.rollback()
                async with conn.begin_nested():
                    await conn.execute(INSERT)
                assert _states(db.state) == ["idle_in_transaction"]
                assert held.tx_start == start
                await conn.commit()
                assert _states(db.state) == ["none"]
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert rows_of(db.activity, db.app_name) == 2
    assert _checkins(db.registry) == {**dict.fromkeys(OUTCOMES, 0.0), "clean": 1.0}
    assert _internal_errors(db.registry) == 0


# -- two-phase commit --------------------------------------------------------------------------


def _spy(engine: Any, seen: list[tuple[str, list[str]]], state: RequestState) -> None:
    """Record the state while each two-phase method runs (installed before instrument_engine,
    so it runs inside the hooks' wrappers, where the driver would)."""
    dialect = engine.dialect
    for name in ("do_prepare_twophase", "do_commit_twophase", "do_rollback_twophase"):
        original = getattr(dialect, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            seen.append((_name, _states(state)))
            return _original(*args, **kw)

        setattr(dialect, name, spy)


def test_two_phase_commit_and_rollback(db: Db) -> None:
    engine = make_engine(db.url, "psycopg", db.app_name, sync=True)
    seen: list[tuple[str, list[str]]] = []
    _spy(engine, seen, db.state)
    instrument_engine(engine, registry=db.registry)
    prepared = int(db.activity.conn.execute("SHOW max_prepared_transactions").fetchone()[0])  # type: ignore[index]
    try:
        with engine.connect() as conn:
            tx = conn.begin_twophase()
            assert _states(db.state) == ["idle_in_transaction"]
            conn.execute(INSERT)
            tx.commit()  # not prepared: one phase
            assert _states(db.state) == ["none"]
            tx = conn.begin_twophase()
            conn.execute(INSERT)
            tx.rollback()
            assert _states(db.state) == ["none"]
            if prepared:  # PREPARE TRANSACTION needs max_prepared_transactions > 0
                tx = conn.begin_twophase()
                conn.execute(INSERT)
                tx.prepare()
                assert _states(db.state) == ["idle_in_transaction"]  # until COMMIT PREPARED
                tx.commit()
                assert _states(db.state) == ["none"]
        expected = [
            ("do_commit_twophase", ["committing"]),
            ("do_rollback_twophase", ["rolling_back"]),
        ]
        if prepared:
            expected += [
                ("do_prepare_twophase", ["committing"]), ("do_commit_twophase", ["committing"])
            ]
        assert seen == expected
        assert rows_of(db.activity, db.app_name) == (2 if prepared else 1)
        assert _checkins(db.registry)["clean"] == 1
        assert _internal_errors(db.registry) == 0
    finally:
        engine.dispose()


# -- a backend terminated mid-transaction ------------------------------------------------------


def test_backend_terminated_mid_transaction_sync(db: Db) -> None:
    engine = db.engine("psycopg", sync=True)
    try:
        with engine.connect() as conn:
            conn.execute(INSERT)
            held = _held(db.state)
            assert held.pid is not None
            _terminate(db.activity, held.pid)
            with pytest.raises(sqlalchemy.exc.OperationalError) as failed:
                conn.execute(text("SELECT 1"))
            assert failed.value.connection_invalidated
            assert not held.running and held.checked_in and _states(db.state) == []
            assert _checkins(db.registry)["invalidated"] == 1
            conn.rollback()
            conn.execute(text("SELECT 1"))  # reconnects: a new check-out, a new backend
            again = _held(db.state)
            assert again.pid not in (None, held.pid)
            assert _states(db.state) == ["idle_in_transaction"]
        assert rows_of(db.activity, db.app_name) == 0
        assert _checkins(db.registry) == {**dict.fromkeys(OUTCOMES, 0.0), "invalidated": 1.0,
                                       "clean": 1.0}
        assert _internal_errors(db.registry) == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_backend_terminated_mid_transaction_async(db: Db, driver: str) -> None:
    async def main() -> None:
        engine = db.engine(driver)
        try:
            async with engine.connect() as conn:
                await conn.execute(INSERT)
                held = _held(db.state)
                assert held.pid is not None
                await asyncio.to_thread(_terminate, db.activity, held.pid)
                with pytest.raises(sqlalchemy.exc.DBAPIError) as failed:
                    await conn.execute(text("SELECT 1"))
                assert failed.value.connection_invalidated
                assert not held.running and held.checked_in and _states(db.state) == []
                await conn.rollback()
                await conn.execute(text("SELECT 1"))
                again = _held(db.state)
                assert again.pid not in (None, held.pid)
                assert _states(db.state) == ["idle_in_transaction"]
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert rows_of(db.activity, db.app_name) == 0
    assert _checkins(db.registry) == {**dict.fromkeys(OUTCOMES, 0.0), "invalidated": 1.0,
                                   "clean": 1.0}
    assert _internal_errors(db.registry) == 0
