"""``instrument_engine()``: SQLAlchemy events → transaction state per connection a request holds.

Pool events follow a connection from check-out to check-in and decide the check-in outcome;
connection events follow its transaction (begin, statement, commit, rollback). The request that
checked a connection out keeps a :class:`DbRequest` in ``state.extras``, which the recorder asks at
detection (snapshot), when writing the span and when the app task ends (connections left open).

Every handler is fail-open: an error is counted and logged once, never raised into SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Any

from prometheus_client import CollectorRegistry

from ..failsafe import internal_error
from ..state import RequestState, current
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


class ConnState:
    """One check-out of one pooled connection."""

    __slots__ = (
        "checked_in",
        "connection",
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
        self, owner: RequestState | None, pid: int | None, db_system: str, metrics: Metrics
    ) -> None:
        self.owner = owner
        self.pid = pid
        self.db_system = db_system
        self.metrics = metrics
        self.tx = NONE  # none | idle_in_transaction | committing | rolling_back
        self.tx_start: float | None = None  # time.time() of begin
        self.running = False  # a statement is executing
        self.connection: weakref.ref[Any] | None = None  # the SQLAlchemy Connection, weakly
        self.outcome: str | None = None  # set by reset / invalidate, counted at check-in
        self.checked_in = False

    def effective_state(self) -> str:
        tx = self.tx
        if tx in (COMMITTING, ROLLING_BACK):
            # No "after commit" event exists: a Connection that left its transaction is done.
            conn = self.connection() if self.connection is not None else None
            if conn is not None and not conn.in_transaction():
                return NONE
            return tx
        if self.running:
            return ACTIVE
        return tx

    def age(self, now: float) -> float | None:
        start = self.tx_start
        if start is None or self.effective_state() == NONE:
            return None
        return max(0.0, now - start)


class DbRequest:
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
        with contextlib.suppress(ValueError):
            self.held.remove(conn)

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
            spans.add_event(
                state.span, spans.EVENT_DB_TRANSACTION_INTERRUPTED, attributes, timestamp
            )
            conn.metrics.db_transactions_interrupted.labels(route, current_state).inc()
        self.interrupted_state = worst
        self.interrupted_age = oldest

    def left_open(self) -> list[ConnState]:
        return [c for c in list(self.held) if not c.checked_in]

    def span_attributes(self, state: RequestState) -> dict[str, Any]:
        if not state.disconnected:
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
        if not state.disconnected:
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
    """The event handlers bound to one sync Engine (an AsyncEngine's ``sync_engine``)."""

    def __init__(self, engine: Any, registry: CollectorRegistry | None) -> None:
        self.engine = weakref.ref(engine)
        self.dialect = engine.dialect
        self.db_system = str(engine.dialect.name)
        self.registry = registry
        self.metrics = metrics_for(registry)
        self.checkins = {
            outcome: self.metrics.db_checkins.labels(outcome)
            for outcome in ("clean", "rolled_back", "terminated", "invalidated")
        }

    def listen(self, engine: Any) -> None:
        from sqlalchemy import event

        for name, fn in self._handlers():
            event.listen(engine, name, fn)

    def remove(self, engine: Any) -> None:
        from sqlalchemy import event

        for name, fn in self._handlers():
            if event.contains(engine, name, fn):
                event.remove(engine, name, fn)

    def _handlers(self) -> list[tuple[str, Any]]:
        return [
            ("checkout", self.on_checkout),
            ("reset", self.on_reset),
            ("invalidate", self.on_invalidate),
            ("checkin", self.on_checkin),
            ("detach", self.on_detach),
            ("begin", self.on_begin),
            ("commit", self.on_commit),
            ("rollback", self.on_rollback),
            ("before_cursor_execute", self.on_before_execute),
            ("after_cursor_execute", self.on_after_execute),
            ("handle_error", self.on_error),
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
            state = current()
            conn = ConnState(state, pid, self.db_system, self.metrics)
            info[KEY] = conn
            checked_out.add(id(record), conn)
            if state is not None:
                state.extra(KEY, DbRequest).add(conn)
        except Exception:
            internal_error("db_checkout", self.registry)

    def on_reset(self, dbapi_connection: Any, record: Any, reset_state: Any) -> None:
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
            owner = conn.owner
            if owner is not None:
                conn.owner = None
                extra = owner.extras.get(KEY) if owner.extras else None
                if extra is not None:
                    extra.remove(conn)
        except Exception:
            internal_error("db_checkin", self.registry)

    # -- connection events ---------------------------------------------------------------------

    def on_begin(self, connection: Any) -> None:
        try:
            conn = _conn_state(connection)
            if conn is None:
                return
            conn.tx = IDLE_IN_TRANSACTION
            conn.tx_start = time.time()
            conn.connection = weakref.ref(connection)
        except Exception:
            internal_error("db_begin", self.registry)

    def on_commit(self, connection: Any) -> None:
        self._ending(connection, COMMITTING)

    def on_rollback(self, connection: Any) -> None:
        self._ending(connection, ROLLING_BACK)

    def _ending(self, connection: Any, tx: str) -> None:
        try:
            conn = _conn_state(connection)
            if conn is not None:
                conn.tx = tx
        except Exception:
            internal_error("db_commit", self.registry)

    def on_before_execute(self, connection: Any, *args: Any) -> None:
        try:
            conn = _conn_state(connection)
            if conn is not None:
                conn.running = True
        except Exception:
            internal_error("db_execute", self.registry)

    def on_after_execute(self, connection: Any, *args: Any) -> None:
        try:
            conn = _conn_state(connection)
            if conn is not None:
                conn.running = False
        except Exception:
            internal_error("db_execute", self.registry)

    def on_error(self, context: Any) -> None:
        try:
            connection = context.connection
            conn = _conn_state(connection) if connection is not None else None
            if conn is not None:
                conn.running = False
        except Exception:
            internal_error("db_error", self.registry)


def _conn_state(connection: Any) -> ConnState | None:
    # Connection.info would try to reconnect an invalidated Connection (and raise): skip those.
    if connection.invalidated or connection.closed:
        return None
    found: ConnState | None = connection.info.get(KEY)
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
