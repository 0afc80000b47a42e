"""The engine hooks without a server: transaction states, check-in outcomes, fail-open, sqlite."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest
import sqlalchemy
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from otel_disconnect.context import reset_current, set_current
from otel_disconnect.db import checkouts
from otel_disconnect.db.engine import KEY, instrument_engine, is_instrumented, uninstrument_engine
from otel_disconnect.state import RequestState

OUTCOMES = ("clean", "rolled_back", "terminated", "invalidated")


def _checkins(registry: CollectorRegistry) -> dict[str, float]:
    return {
        o: registry.get_sample_value("otel_disconnect_db_checkins_total", {"outcome": o}) or 0.0
        for o in OUTCOMES
    }


def _request() -> tuple[RequestState, Any]:
    state = RequestState({"type": "http", "method": "GET"})
    return state, set_current(state)


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
        reset_current(token)
        engine.dispose()


def _with_functions(engine: Any, **functions: Any) -> None:
    """SQL functions the driver calls while it runs a statement: a window into that moment."""

    def connect(dbapi_connection: Any, record: Any) -> None:
        for name, fn in functions.items():
            dbapi_connection.create_function(name, 0, fn)

    sqlalchemy.event.listen(engine, "connect", connect)


def test_statement_running_is_active_while_the_driver_runs_it() -> None:
    registry = CollectorRegistry()
    engine = sqlalchemy.create_engine("sqlite://")
    seen: list[list[str]] = []
    state, token = _request()

    def observe() -> int:
        seen.append(_states(state))
        return 1

    def fail() -> int:
        raise ValueError("inside the statement")

    _with_functions(engine, observe=observe, fail=fail)
    instrument_engine(engine, registry=registry)
    try:
        with engine.connect() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("SELECT observe()"))  # do_execute
            conn.execution_options(no_parameters=True).exec_driver_sql("SELECT observe()")
            conn.execute(text("INSERT INTO t VALUES (observe() + :x)"), [{"x": 1}, {"x": 2}])
            assert len(seen) == 4  # executemany: once per row
            held = state.extras[KEY].held[0]
            assert not held.running
            with pytest.raises(sqlalchemy.exc.OperationalError, match="user-defined function"):
                conn.execute(text("SELECT fail()"))
            assert not held.running
            assert _states(state) == ["idle_in_transaction"]
        assert seen == [["active"]] * 4
        assert _internal_errors(registry) == 0
    finally:
        reset_current(token)
        engine.dispose()


def _internal_errors(registry: CollectorRegistry) -> float:
    return sum(
        s.value for m in registry.collect() for s in m.samples
        if s.name == "otel_disconnect_internal_errors_total"
    )


class Halt(BaseException):
    """Not an Exception: what a cancellation looks like to SQLAlchemy."""


def test_driver_exceptions_propagate_unchanged_and_clear_the_state() -> None:
    registry = CollectorRegistry()
    engine = sqlalchemy.create_engine("sqlite://")
    dialect = engine.dialect
    cls = type(dialect)
    raised = {"boom": sqlite3.OperationalError("boom"), "halt": Halt()}

    # Installed before instrument_engine, so the engine hooks wrap them: these stand for the driver.
    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        for word, exception in raised.items():
            if word in statement:
                raise exception
        cls.do_execute(dialect, cursor, statement, parameters, context)

    def do_commit(dbapi_connection: Any) -> None:
        raise raised["boom"]

    def do_begin(dbapi_connection: Any) -> None:
        if begin_fails:
            raise raised["boom"]

    begin_fails = True
    dialect.do_execute = do_execute  # type: ignore[method-assign]
    dialect.do_commit = do_commit  # type: ignore[method-assign]
    dialect.do_begin = do_begin  # type: ignore[method-assign]
    instrument_engine(engine, registry=registry)
    state, token = _request()
    try:
        with engine.connect() as conn:
            held = state.extras[KEY].held[0]
            with pytest.raises(sqlalchemy.exc.OperationalError) as failed:
                conn.begin()
            assert failed.value.orig is raised["boom"]
            assert not conn.in_transaction() and held.tx == "none" and held.tx_start is None
            begin_fails = False
            conn.execute(text("SELECT 1"))
            with pytest.raises(sqlalchemy.exc.OperationalError) as failed:
                conn.execute(text("SELECT 'boom'"))
            assert failed.value.orig is raised["boom"]
            assert not held.running and held.tx == "idle_in_transaction"
            with pytest.raises(sqlalchemy.exc.OperationalError) as failed:
                conn.commit()
            assert failed.value.orig is raised["boom"]
            # SQLAlchemy ends the transaction whether or not COMMIT succeeded; so do we.
            assert not conn.in_transaction() and _states(state) == ["none"]
            conn.rollback()  # SQLAlchemy asks for it after a failed commit
            conn.execute(text("SELECT 1"))
            with pytest.raises(Halt) as halted:
                conn.execute(text("SELECT 'halt'"))
            assert halted.value is raised["halt"]
            assert not held.running
            # A BaseException mid-statement makes SQLAlchemy invalidate the connection.
            assert held.checked_in and _states(state) == []
        assert _checkins(registry)["invalidated"] == 1
        assert _internal_errors(registry) == 0
    finally:
        reset_current(token)
        engine.dispose()
        # The raised exceptions' tracebacks hold this frame (the engine, the request state), and
        # the engine's hooks hold the stand-in driver methods that hold them: let them all go.
        uninstrument_engine(engine)
        raised.clear()


def test_commit_and_rollback_states_while_the_driver_ends_the_transaction() -> None:
    engine = sqlalchemy.create_engine("sqlite://")
    engine.connect().close()  # the first connect's own rollback happens before we look
    dialect = engine.dialect
    cls = type(dialect)
    seen: list[tuple[str, list[str]]] = []
    state, token = _request()

    def do_commit(dbapi_connection: Any) -> None:
        seen.append(("commit", _states(state)))
        cls.do_commit(dialect, dbapi_connection)

    def do_rollback(dbapi_connection: Any) -> None:
        seen.append(("rollback", _states(state)))
        cls.do_rollback(dialect, dbapi_connection)

    dialect.do_commit = do_commit  # type: ignore[method-assign]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign]
    registry = CollectorRegistry()
    instrument_engine(engine, registry=registry)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.commit()
            assert _states(state) == ["none"]
            conn.begin()
            conn.rollback()
            assert _states(state) == ["none"]
        # Leaving the block, the pool rolls the clean connection back: no transaction to end.
        assert seen == [
            ("commit", ["committing"]), ("rollback", ["rolling_back"]), ("rollback", ["none"])
        ]
        assert _checkins(registry) == {**dict.fromkeys(OUTCOMES, 0.0), "clean": 1.0}
    finally:
        reset_current(token)
        engine.dispose()


WRAPPED = (
    "do_begin", "do_commit", "do_rollback", "do_execute", "do_executemany",
    "do_execute_no_params", "do_begin_twophase", "do_prepare_twophase", "do_commit_twophase",
    "do_rollback_twophase",
)


def test_no_connection_events_and_uninstrument_restores_the_dialect() -> None:
    engine = sqlalchemy.create_engine("sqlite://")
    dialect = engine.dialect

    def own_commit(dbapi_connection: Any) -> None:  # the app's own, before ours
        type(dialect).do_commit(dialect, dbapi_connection)

    dialect.do_commit = own_commit  # type: ignore[method-assign]
    before = {name: dialect.__dict__.get(name) for name in WRAPPED}
    instrument_engine(engine, registry=CollectorRegistry())
    assert all(dialect.__dict__.get(name) is not before[name] for name in WRAPPED)
    # What makes the hooks cheap: SQLAlchemy sees no Connection-level listener.
    assert not engine._has_events
    with engine.connect() as conn:
        assert not conn._has_events
    uninstrument_engine(engine)
    assert {name: dialect.__dict__.get(name) for name in WRAPPED} == before
    assert dialect.do_commit is own_commit and "do_execute" not in dialect.__dict__


def test_uninstrument_under_someone_elses_wrapper_leaves_it_working() -> None:
    registry = CollectorRegistry()
    engine = instrument_engine(sqlalchemy.create_engine("sqlite://"), registry=registry)
    dialect = engine.dialect
    ours = dialect.do_execute
    calls: list[str] = []

    def theirs(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        calls.append(statement)
        ours(cursor, statement, parameters, context)

    dialect.do_execute = theirs  # type: ignore[method-assign]
    uninstrument_engine(engine)
    assert dialect.do_execute is theirs  # not ours to take out
    state, token = _request()
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 7")).scalar_one() == 7
        assert calls == ["SELECT 7"] and state.extras is None
    finally:
        reset_current(token)
        engine.dispose()


def test_two_engines_are_instrumented_independently() -> None:
    reg_a, reg_c = CollectorRegistry(), CollectorRegistry()
    a = instrument_engine(sqlalchemy.create_engine("sqlite://"), registry=reg_a)
    b = sqlalchemy.create_engine("sqlite://")
    c = instrument_engine(sqlalchemy.create_engine("sqlite://"), registry=reg_c)
    assert a.dialect is not c.dialect
    assert not any(name in b.dialect.__dict__ for name in WRAPPED)
    state, token = _request()
    try:
        with a.connect() as conn_a, b.connect() as conn_b, c.connect() as conn_c:
            conn_a.execute(text("SELECT 1"))
            conn_b.execute(text("SELECT 1"))
            assert _states(state) == ["idle_in_transaction", "none"]  # b is not tracked
            conn_a.commit()
            conn_c.execute(text("SELECT 1"))
            assert _states(state) == ["none", "idle_in_transaction"]
        assert _checkins(reg_a)["clean"] == 1 and _checkins(reg_c)["clean"] == 1
        uninstrument_engine(a)
        with a.connect() as conn_a, c.connect() as conn_c:
            conn_a.execute(text("SELECT 1"))
            conn_c.execute(text("SELECT 1"))
            assert _states(state) == ["idle_in_transaction"]  # c's only
        assert _checkins(reg_a)["clean"] == 1 and _checkins(reg_c)["clean"] == 2
    finally:
        reset_current(token)
        for engine in (a, b, c):
            engine.dispose()


def test_invalidated_mid_transaction_then_reconnected() -> None:
    registry = CollectorRegistry()
    engine = instrument_engine(sqlalchemy.create_engine("sqlite://"), registry=registry)
    state, token = _request()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            first = state.extras[KEY].held[0]
            conn.invalidate()
            assert first.checked_in and _states(state) == []
            assert _checkins(registry)["invalidated"] == 1
            conn.rollback()  # no DBAPI connection left to roll back: the state stays as it was
            conn.execute(text("SELECT 1"))  # a new check-out
            [second] = state.extras[KEY].held
            assert second is not first and _states(state) == ["idle_in_transaction"]
        assert _checkins(registry) == {**dict.fromkeys(OUTCOMES, 0.0), "invalidated": 1.0,
                                       "clean": 1.0}
        assert _internal_errors(registry) == 0
    finally:
        reset_current(token)
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
            reset_current(token)
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
