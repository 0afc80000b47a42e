"""``instrument_engine()``: SQLAlchemy engine → transaction state per connection a request holds.

Pool events follow a connection from check-out to check-in and decide the check-in outcome;
wrappers of the engine's own dialect methods (``do_begin``, ``do_commit``, ``do_rollback``,
``do_execute``…) follow its transaction. Connection-level events would do the same at several
times the cost: any such listener makes SQLAlchemy dispatch events on every Connection and
statement. The request that checked a connection out keeps a :class:`DbRequest` in
``state.extras``, which the recorder asks at detection (snapshot), when writing the span and when
the app task ends (connections left open).

Every handler is fail-open: an error is counted and logged once, never raised into SQLAlchemy;
what the wrapped methods return or raise reaches SQLAlchemy unchanged.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

from prometheus_client import CollectorRegistry

from ..compat.sqlalchemy import context_entry_info, entry_info
from ..context import current_state
from ..failsafe import internal_error
from ..fleet import process as fleet
from ..state import Extension, RequestState
from ..telemetry import spans
from ..telemetry.metrics import Metrics, metrics_for
from . import checkouts as checked_out

KEY = "otel_disconnect.db"  # in state.extras and in the pool's connection_record.info
_PID_KEY = "otel_disconnect.backend_pid"

NONE = "none"
IDLE_IN_TRANSACTION = "idle_in_transaction"
ACTIVE = "active"
COMMITTING = "committing"
ROLLING_BACK = "rolling_back"
_RANK = {NONE: 0, IDLE_IN_TRANSACTION: 1, ACTIVE: 2, COMMITTING: 3, ROLLING_BACK: 3}

# A request that checks out connection after connection keeps only this many pids.
MAX_PIDS = 32

_instrumented: weakref.WeakKeyDictionary[Any, EngineHooks] = weakref.WeakKeyDictionary()
_instrument_lock = threading.Lock()


def conn_state(
    proxied: Any,
    where: str = "db_lookup",
    registry: CollectorRegistry | None = None,
    info: Callable[[Any], dict[Any, Any]] | None = None,
) -> ConnState | None:
    """The ConnState of a checked-out connection (what the dialect methods get), or None;
    ``info=context_entry_info`` for an execution context.

    Fails open: anything else than a connection detached from its pool is an internal error,
    counted under ``where`` in ``registry``."""
    try:
        found: ConnState | None = (info or entry_info)(proxied).get(KEY)
        return found
    except AttributeError:  # detached from its pool
        return None
    except Exception:
        internal_error(where, registry)
        return None


class ConnState:
    """One check-out of one pooled connection."""

    __slots__ = (
        "checked_in",
        "claimed",
        "database",
        "db_system",
        "metrics",
        "outcome",
        "owner",
        "pid",
        "running",
        "tx",
        "tx_start",
    )

    def __init__(
        self,
        owner: RequestState | None,
        pid: int | None,
        db_system: str,
        metrics: Metrics,
        database: str = "",
    ) -> None:
        self.owner = owner
        self.database = database  # the database name, for the fleet's orphan events
        self.claimed: str | None = None  # the owner a fleet orphan event named
        self.pid = pid
        self.db_system = db_system
        self.metrics = metrics
        self.tx = NONE  # none | idle_in_transaction | committing | rolling_back
        self.tx_start: float | None = None  # time.time() of begin
        self.running = False  # a statement is executing
        self.outcome: str | None = None  # set by reset / invalidate, counted at check-in
        self.checked_in = False

    def effective_state(self) -> str:
        tx = self.tx
        if self.running and tx not in (COMMITTING, ROLLING_BACK):
            return ACTIVE
        return tx

    def age(self, now: float) -> float | None:
        start = self.tx_start
        if start is None or self.effective_state() == NONE:
            return None
        return max(0.0, now - start)


class DbRequest(Extension):
    """The database side of one request (``state.extras[KEY]``), read by the recorder."""

    __slots__ = ("held", "interrupted_age", "interrupted_state", "left_open_written", "pids")

    def __init__(self) -> None:
        self.held: list[ConnState] = []
        self.pids: list[int] = []
        self.interrupted_state: str | None = None
        self.interrupted_age: float | None = None
        self.left_open_written = False

    def add(self, conn: ConnState) -> None:
        self.held.append(conn)
        pid = conn.pid
        if pid is not None and pid not in self.pids and len(self.pids) < MAX_PIDS:
            self.pids.append(pid)

    def remove(self, conn: ConnState) -> None:
        held = self.held  # a request holds one or two connections: scanning twice costs nothing
        if conn in held:
            held.remove(conn)

    # -- recorder hooks ------------------------------------------------------------------------

    def on_disconnect(self, state: RequestState) -> None:
        """Snapshot every held connection at detection: what was the database doing?"""
        now = time.time()
        worst = NONE
        oldest: float | None = None
        route = state.route or "unmatched"
        timestamp = int((state.disconnected_at or now) * 1e9)
        for conn in list(self.held):
            current_state = conn.effective_state()
            if _RANK[current_state] > _RANK[worst]:
                worst = current_state
            if current_state == NONE:
                continue
            age = conn.age(now)
            if age is not None and (oldest is None or age > oldest):
                oldest = age
            attributes: dict[str, Any] = {
                spans.DB_TRANSACTION_STATE: current_state,
                spans.DB_STATEMENT_RUNNING: conn.running,
                spans.DB_SYSTEM_NAME: conn.db_system,
            }
            if age is not None:
                attributes[spans.DB_TRANSACTION_AGE_S] = age
            if conn.pid is not None:
                attributes[spans.DB_BACKEND_PID] = conn.pid
                if fleet.current() is not None:
                    fleet.claim(conn, "disconnected", state)
            spans.add_event(
                state.span, spans.EVENT_DB_TRANSACTION_INTERRUPTED, attributes, timestamp
            )
            conn.metrics.db_transactions_interrupted.labels(route, current_state).inc()
        self.interrupted_state = worst
        self.interrupted_age = oldest

    def left_open(self) -> list[ConnState]:
        return [c for c in list(self.held) if not c.checked_in]

    def span_attributes(self, state: RequestState) -> dict[str, Any]:
        if state.detected_perf is None:
            return {}
        attributes: dict[str, Any] = {
            spans.DB_TRANSACTION_STATE: self.interrupted_state or NONE,
        }
        if self.interrupted_age is not None:
            attributes[spans.DB_TRANSACTION_AGE_S] = self.interrupted_age
        if self.pids:
            attributes[spans.DB_BACKEND_PIDS] = list(self.pids)
        # Exact once the app task ended. Written earlier only when the span ends first (the
        # final body was sent after the disconnect): then it counts what is held at that send.
        attributes[spans.DB_LEFT_OPEN] = len(self.left_open())
        self.left_open_written = state.ended
        return attributes

    def record_end(self, state: RequestState, metrics: Metrics, route: str) -> None:
        if fleet.current() is not None:
            # A connection still held in a transaction when its request ended: tell the fleet's
            # pg-exporter whose it is (a leak, client or not).
            for conn in self.left_open():
                if conn.effective_state() != NONE:
                    fleet.claim(conn, "ended", state)
        if state.detected_perf is None:
            return
        left = self.left_open()
        for conn in left:
            metrics.db_connections_left_open.labels(route, conn.effective_state()).inc()
        if not self.left_open_written:
            # Still recording only when the span outlives the final send; then correct it.
            spans.set_attributes(state.span, {spans.DB_LEFT_OPEN: len(left)})
            self.left_open_written = True


def _backend_pid(driver_connection: Any) -> int | None:
    """The PostgreSQL backend pid the driver already knows (no round trip); None for sqlite."""
    get_server_pid = getattr(driver_connection, "get_server_pid", None)  # asyncpg
    if get_server_pid is not None:
        return int(get_server_pid())
    info = getattr(driver_connection, "info", None)  # psycopg 3
    pid = getattr(info, "backend_pid", None)
    return int(pid) if isinstance(pid, int) else None


class EngineHooks:
    """The pool event handlers and dialect wrappers bound to one sync Engine (an AsyncEngine's
    ``sync_engine``)."""

    def __init__(self, engine: Any, registry: CollectorRegistry | None) -> None:
        self.engine = weakref.ref(engine)
        self.dialect = engine.dialect
        self.db_system = str(engine.dialect.name)
        # The database name the fleet's orphan events carry (PostgreSQL's default: the user).
        self.database = str(engine.url.database or engine.url.username or "")
        self.registry = registry
        self.metrics = metrics_for(registry)
        self.checkins = {
            outcome: self.metrics.db_checkins.labels(outcome)
            for outcome in ("clean", "rolled_back", "terminated", "invalidated")
        }
        # name -> (what the dialect instance held before: _ABSENT or its own attribute, ours)
        self.wrapped: dict[str, tuple[Any, Any]] = {}
        # False once removed: a wrapper someone else wrapped again cannot be taken out, so it
        # stays in place and only calls through.
        self.active = True

    def listen(self, engine: Any) -> None:
        from sqlalchemy import event

        for name, fn in self._handlers():
            event.listen(engine, name, fn)
        self._wrap_dialect()

    def remove(self, engine: Any) -> None:
        from sqlalchemy import event

        self.active = False
        self._unwrap_dialect()
        for name, fn in self._handlers():
            if event.contains(engine, name, fn):
                event.remove(engine, name, fn)

    def _handlers(self) -> list[tuple[str, Any]]:
        # Pool events only: they run once per check-out / check-in. Any Connection-level listener
        # (begin, commit, before_cursor_execute, ...) would make SQLAlchemy set up event dispatch
        # on every new Connection and run it on every statement; the dialect wrappers below
        # follow the transaction instead.
        return [
            ("checkout", self.on_checkout),
            ("reset", self.on_reset),
            ("invalidate", self.on_invalidate),
            ("checkin", self.on_checkin),
            ("detach", self.on_detach),
        ]

    # -- pool events ---------------------------------------------------------------------------

    def on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        try:
            info = record.info
            pid = info.get(_PID_KEY)
            if pid is None and self.db_system == "postgresql":
                pid = info[_PID_KEY] = _backend_pid(
                    self.dialect.get_driver_connection(dbapi_connection)
                )
            state = current_state()
            conn = ConnState(state, pid, self.db_system, self.metrics, self.database)
            info[KEY] = conn
            checked_out.add(id(record), conn)
            if state is not None:
                extras = state.extras
                found = extras.get(KEY) if extras is not None else None
                cast(DbRequest, found or state.extra(KEY, DbRequest)).add(conn)
        except Exception:
            internal_error("db_checkout", self.registry)

    def on_reset(self, dbapi_connection: Any, record: Any, reset_state: Any) -> None:
        # The pool dispatches "reset" before its own rollback (the wrapped do_rollback), so the
        # state read here is the one the request left behind.
        try:
            conn = checked_out.get(id(record))
            if conn is None or conn.outcome is not None:
                return
            if reset_state.terminate_only or not reset_state.asyncio_safe:
                # Garbage-collected (asyncio) connections are terminated, never rolled back.
                conn.outcome = "terminated"
            elif not reset_state.transaction_was_reset and conn.effective_state() != NONE:
                # The pool rolls back on every return; it matters only when a transaction was open.
                conn.outcome = "rolled_back"
        except Exception:
            internal_error("db_reset", self.registry)

    def on_invalidate(self, dbapi_connection: Any, record: Any, exception: Any) -> None:
        conn = checked_out.get(id(record))
        if conn is not None:
            conn.outcome = "invalidated"

    def on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        self._finish(record, "invalidated" if dbapi_connection is None else "clean")

    def on_detach(self, dbapi_connection: Any, record: Any) -> None:
        # A garbage-collected asyncio connection is detached and terminated, never checked in.
        self._finish(record, "terminated")

    def _finish(self, record: Any, default: str) -> None:
        try:
            conn = checked_out.pop(id(record))
            if conn is None:
                return
            conn.checked_in = True
            self.checkins[conn.outcome or default].inc()
            if conn.claimed is not None:
                fleet.release(conn)
            owner = conn.owner
            if owner is not None:
                conn.owner = None
                extra = owner.extras.get(KEY) if owner.extras else None
                if extra is not None:
                    cast(DbRequest, extra).remove(conn)
        except Exception:
            internal_error("db_checkin", self.registry)

    # -- dialect wrappers ----------------------------------------------------------------------
    #
    # Every Engine has its own dialect instance, so an instance attribute wraps this engine's
    # methods only. Connection calls dialect.do_begin / do_commit / do_rollback with the pooled
    # connection (the pool's own reset rollback too), do_execute / do_execute_no_params /
    # do_executemany with the execution context, and the two-phase methods with the Connection.
    # Savepoints are statements (do_savepoint executes SAVEPOINT): they leave the state alone.
    # Each wrapper looks its ConnState up (None: not checked out by us), changes it around the
    # real call, and lets the real call's result or exception through untouched.

    def _wrap_dialect(self) -> None:
        dialect = self.dialect
        makers: dict[str, Callable[[Any], Any]] = {
            "do_begin": self._begin,
            "do_commit": lambda original: self._ending(original, COMMITTING, "db_commit"),
            "do_rollback": lambda original: self._ending(original, ROLLING_BACK, "db_commit"),
            "do_execute": self._execute,
            "do_executemany": self._execute,
            "do_execute_no_params": self._execute_no_params,
            "do_begin_twophase": self._begin_twophase,
            "do_prepare_twophase": self._prepare_twophase,
            "do_commit_twophase": lambda original: self._ending_twophase(original, COMMITTING),
            "do_rollback_twophase": lambda original: self._ending_twophase(original, ROLLING_BACK),
        }
        for name, make in makers.items():
            original = getattr(dialect, name, None)
            if original is None:
                continue
            wrapper = make(original)
            self.wrapped[name] = (_own_attribute(dialect, name, original), wrapper)
            setattr(dialect, name, wrapper)

    def _unwrap_dialect(self) -> None:
        dialect = self.dialect
        for name, (previous, wrapper) in self.wrapped.items():
            if getattr(dialect, name, None) is not wrapper:
                continue  # wrapped again on top of ours: leave it (ours now calls through)
            if previous is _ABSENT:
                delattr(dialect, name)  # back to the class's method
            else:
                setattr(dialect, name, previous)
        self.wrapped.clear()

    def _lookup_connection(self, connection: Any, where: str) -> ConnState | None:
        """The ConnState behind a SQLAlchemy Connection (the two-phase methods get one)."""
        if not self.active:
            return None
        try:
            # Connection.connection would try to reconnect an invalidated Connection: skip those.
            if connection.invalidated or connection.closed:
                return None
            return conn_state(connection.connection, where, self.registry)
        except Exception:
            internal_error(where, self.registry)
            return None

    def _begin(self, original: Any) -> Any:
        hooks = self

        @functools.wraps(original)
        def do_begin(dbapi_connection: Any) -> Any:
            if not hooks.active:
                return original(dbapi_connection)
            conn = conn_state(dbapi_connection, "db_begin", hooks.registry)
            result = _begin_on(conn, original, dbapi_connection)
            if conn is not None:
                owner = conn.owner
                if owner is not None and (owner.detected_perf is not None or owner.ended):
                    # Work that goes on after its client left (or after its request ended) may
                    # begin a transaction only then, e.g. once its first connection is made:
                    # the snapshot at detection or at the end missed it; the fleet hears of it.
                    hooks.claim_late(conn, owner)
            return result

        return do_begin

    def claim_late(self, conn: ConnState, owner: RequestState) -> None:
        try:
            if fleet.current() is not None and conn.pid is not None:
                fleet.claim(conn, "ended" if owner.ended else "disconnected", owner)
        except Exception:
            internal_error("db_begin", self.registry)

    def _begin_twophase(self, original: Any) -> Any:
        lookup = self._lookup_connection

        @functools.wraps(original)
        def do_begin_twophase(connection: Any, xid: Any) -> Any:
            return _begin_on(lookup(connection, "db_begin"), original, connection, xid)

        return do_begin_twophase

    def _ending(self, original: Any, during: str, where: str) -> Any:
        hooks = self

        @functools.wraps(original)
        def ending(dbapi_connection: Any) -> Any:
            conn = conn_state(dbapi_connection, where, hooks.registry) if hooks.active else None
            return _end_on(conn, during, original, dbapi_connection)

        return ending

    def _ending_twophase(self, original: Any, during: str) -> Any:
        lookup = self._lookup_connection

        @functools.wraps(original)
        def ending(connection: Any, xid: Any, *args: Any, **kwargs: Any) -> Any:
            conn = lookup(connection, "db_commit")
            return _end_on(conn, during, original, connection, xid, *args, **kwargs)

        return ending

    def _prepare_twophase(self, original: Any) -> Any:
        lookup = self._lookup_connection

        @functools.wraps(original)
        def do_prepare_twophase(connection: Any, xid: Any) -> Any:
            conn = lookup(connection, "db_commit")
            if conn is None or conn.tx != IDLE_IN_TRANSACTION:
                return original(connection, xid)
            # Phase one of the commit; the transaction stays open until COMMIT/ROLLBACK PREPARED.
            conn.tx = COMMITTING
            try:
                return original(connection, xid)
            finally:
                conn.tx = IDLE_IN_TRANSACTION

        return do_prepare_twophase

    def _execute(self, original: Any) -> Any:
        hooks = self

        @functools.wraps(original)
        def execute(cursor: Any, statement: Any, parameters: Any, context: Any = None) -> Any:
            conn = None  # context is None only for some mssql defaults
            if hooks.active and context is not None:
                conn = conn_state(context, "db_execute", hooks.registry, context_entry_info)
            if conn is None:
                return original(cursor, statement, parameters, context)
            conn.running = True
            try:
                return original(cursor, statement, parameters, context)
            finally:
                conn.running = False  # what handle_error did: a failed statement is not running

        return execute

    def _execute_no_params(self, original: Any) -> Any:
        hooks = self

        @functools.wraps(original)
        def do_execute_no_params(cursor: Any, statement: Any, context: Any = None) -> Any:
            conn = None
            if hooks.active and context is not None:
                conn = conn_state(context, "db_execute", hooks.registry, context_entry_info)
            if conn is None:
                return original(cursor, statement, context)
            conn.running = True
            try:
                return original(cursor, statement, context)
            finally:
                conn.running = False

        return do_execute_no_params


_ABSENT = object()  # the dialect instance had no attribute of its own: the class's method ran


def _begin_on(conn: ConnState | None, call: Callable[..., Any], *args: Any) -> Any:
    """A dialect's begin for ``conn``: idle in transaction from now on, unless it raises."""
    if conn is None:
        return call(*args)
    before = conn.tx, conn.tx_start
    conn.tx = IDLE_IN_TRANSACTION
    conn.tx_start = time.time()
    try:
        return call(*args)
    except BaseException:
        conn.tx, conn.tx_start = before  # no transaction began
        raise


def _end_on(
    conn: ConnState | None, during: str, call: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """A dialect's commit or rollback for ``conn``: ``during`` while it runs, then none.

    Only an open transaction ends: the pool's rollback of a clean connection, or the do_rollback
    a two-phase commit runs inside do_commit_twophase, changes nothing."""
    if conn is None or conn.tx != IDLE_IN_TRANSACTION:
        return call(*args, **kwargs)
    conn.tx = during
    try:
        return call(*args, **kwargs)
    finally:
        # Returned or raised, SQLAlchemy is done with this transaction either way.
        conn.tx = NONE
        conn.tx_start = None


def _own_attribute(dialect: Any, name: str, found: Any) -> Any:
    """What the instance itself held under ``name`` (``found``), or _ABSENT for the class's method.

    Without reading ``dialect.__dict__``: on CPython 3.11+ that turns the instance's inline
    attribute values into a real dict, and every later ``dialect.x`` SQLAlchemy reads per
    statement gets slower (measured: +3% instructions per sqlite statement).
    """
    if getattr(found, "__self__", None) is dialect and getattr(found, "__func__", None) is getattr(
        type(dialect), name, None
    ):
        return _ABSENT
    return found


def _sync_engine(engine: Any) -> Any:
    return getattr(engine, "sync_engine", engine)  # AsyncEngine wraps a sync Engine


def instrument_engine(engine: Any, *, registry: CollectorRegistry | None = None) -> Any:
    """Follow the transactions of ``engine`` (a sync ``Engine`` or an ``AsyncEngine``).

    Check-in outcomes go to ``registry`` (the global one by default); per-request state goes to the
    request that checked the connection out. Instrumenting an engine twice changes nothing.
    Returns the engine.
    """
    sync = _sync_engine(engine)
    with _instrument_lock:
        if sync in _instrumented:
            return engine
        hooks = EngineHooks(sync, registry)
        hooks.listen(sync)
        _instrumented[sync] = hooks
    return engine


def uninstrument_engine(engine: Any) -> None:
    """Remove the hooks of :func:`instrument_engine` (connections checked out now stay tracked)."""
    sync = _sync_engine(engine)
    with _instrument_lock:
        hooks = _instrumented.pop(sync, None)
    if hooks is not None:
        hooks.remove(sync)


def is_instrumented(engine: Any) -> bool:
    return _sync_engine(engine) in _instrumented
