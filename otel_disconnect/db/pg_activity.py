"""``PgActivityCollector``: PostgreSQL backends from ``pg_stat_activity``, read at scrape time.

Safe under load by construction: its own autocommit connection (so it is never itself idle in
transaction), one query per scrape, a server-side ``statement_timeout`` set once at connect, and a
connect timeout. Needs only the ``pg_monitor`` role. When PostgreSQL is unreachable the scrape
still succeeds with ``otel_disconnect_pg_up 0``; the next scrape reconnects.

Orphan attribution: a backend ``idle in transaction`` whose pid a pool of this process has checked
out for a request that ended (a leak) or whose client disconnected (work for nobody) is counted
in ``otel_disconnect_pg_orphaned_transactions``, logged once with the request's trace id, and
added as a ``db.transaction.orphaned`` event to the request's span while that span still records.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from ..failsafe import internal_error
from ..telemetry import spans
from ..telemetry.metrics import PREFIX
from ..telemetry.spans import trace_id_hex
from . import checkouts
from .libpq_url import conninfo

logger = logging.getLogger("otel_disconnect.pg")

_QUERY = """
SELECT coalesce(a.datname, ''), coalesce(a.application_name, ''), a.state, a.pid,
       extract(epoch FROM now() - a.state_change)::float8,
       extract(epoch FROM now() - a.xact_start)::float8,
       (SELECT setting::float8 / 1000 FROM pg_settings
         WHERE name = 'idle_in_transaction_session_timeout')
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
"""

_IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")
OWNERS = ("ended", "disconnected")
# application_name is chosen by clients: cap the distinct values one scrape exports.
MAX_APPLICATION_NAMES = 50
OTHER = "other"

Row = tuple[str, str, "str | None", int, "float | None", "float | None", "float | None"]


def _dsn_of(dsn_or_engine: Any) -> str:
    if isinstance(dsn_or_engine, str):
        return dsn_or_engine
    url = getattr(dsn_or_engine, "url", None)
    if url is None:
        raise TypeError("PgActivityCollector needs a libpq DSN or a SQLAlchemy engine")
    return conninfo(url)


class PgActivityCollector:
    """A Prometheus collector over ``pg_stat_activity`` (docs/reference.md lists its series).

    ``PgActivityCollector("host=db user=monitor dbname=app")`` or ``PgActivityCollector(engine)``
    (it opens its own connection from the engine's URL). ``orphans=False`` leaves out the orphan
    series (a standalone exporter has no pool to ask).

    Where the series go is chosen as for the middleware: ``registry=`` is a prometheus-client
    registry (None: the global ``REGISTRY``), ``meter_provider=`` a MeterProvider (None: the
    global one), and ``metrics="auto" | "prometheus" | "opentelemetry" | "both"`` (None:
    ``OTEL_DISCONNECT_METRICS``, else ``auto``) picks between them. ``auto`` is OpenTelemetry
    when a MeterProvider that exports somewhere is configured and no ``registry=`` was passed.
    On OpenTelemetry the series are observable gauges, one query per collection.
    """

    def __init__(
        self,
        dsn_or_engine: Any,
        *,
        registry: CollectorRegistry | None = None,
        metrics: str | None = None,
        statement_timeout_s: float = 2.0,
        connect_timeout_s: float = 3.0,
        application_name: str = "otel-disconnect",
        orphans: bool = True,
        claims: Any = None,
        meter_provider: Any = None,
    ) -> None:
        if statement_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("statement_timeout_s and connect_timeout_s must be positive")
        self.dsn = _dsn_of(dsn_or_engine)
        self.statement_timeout_ms = max(1, int(statement_timeout_s * 1000))
        # libpq's connect_timeout takes whole seconds; 1 is its minimum useful value.
        self.connect_timeout_s = max(1, round(connect_timeout_s))
        self.application_name = application_name
        # The fleet's claims (fleet.orphans.Claims, filled from Redis by pg-exporter --redis-url):
        # backends other processes hold for requests that ended or lost their client.
        self.claims = claims
        self.orphans = orphans or claims is not None
        self._query_started = 0.0
        self._conn: Any = None
        self._lock = threading.Lock()
        self._reported: set[tuple[int, int, str]] = set()
        self._snapshot: dict[str, list[tuple[float, dict[str, str]]]] = {}
        from ..config import metrics_option
        from ..telemetry.sinks import choose, global_meter_provider

        self.registry = registry
        sink = choose(metrics_option(metrics), registry, meter_provider)
        if sink in ("prometheus", "both"):
            (REGISTRY if registry is None else registry).register(self)
        if sink in ("opentelemetry", "both"):
            self._observe_with(meter_provider or global_meter_provider())

    # -- the OpenTelemetry path ----------------------------------------------------------------

    def _observe_with(self, meter_provider: Any) -> None:
        """One observable gauge per family. The SDK calls an observable instrument's callbacks
        in the order the instruments were made, so the first family's callback runs the query
        and the others read what it found: one query per collection, as per scrape."""
        from ..telemetry.otel_metrics import METER_NAME
        from ..version import __version__

        meter = meter_provider.get_meter(METER_NAME, __version__)
        for index, family in enumerate(self._families()):
            unit = "s" if family.name.endswith("_seconds") else ""
            meter.create_observable_gauge(
                family.name,
                callbacks=[self._callback(family.name, refresh=index == 0)],
                unit=unit,
                description=family.documentation,
            )

    def _callback(self, name: str, refresh: bool) -> Any:
        from opentelemetry.metrics import Observation

        def observe(options: Any) -> list[Observation]:
            try:
                if refresh or not self._snapshot:
                    self._snapshot = {
                        family.name: [(s.value, dict(s.labels)) for s in family.samples]
                        for family in self.collect()
                    }
                return [Observation(v, labels) for v, labels in self._snapshot.get(name, ())]
            except Exception:
                internal_error("pg_activity", self.registry)
                return []

        return observe

    # -- the connection ------------------------------------------------------------------------

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=self.connect_timeout_s,
            application_name=self.application_name,
            options=f"-c statement_timeout={self.statement_timeout_ms}",
        )

    def _query(self) -> list[Row]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        self._query_started = time.monotonic()
        try:
            rows: list[Row] = self._conn.execute(_QUERY).fetchall()
            return rows
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- prometheus_client collector protocol -------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        # Without describe(), registering would run a query just to learn the names.
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            try:
                rows = self._query()
            except Exception as exc:
                logger.warning("pg_stat_activity scrape failed: %s", exc)
                families = self._families()
                families[-1].add_metric([], 0)
                yield from families
                return
        yield from self._build(rows)

    # -- turning rows into series --------------------------------------------------------------

    def _families(self) -> list[GaugeMetricFamily]:
        families = [
            GaugeMetricFamily(
                PREFIX + "pg_backends", "PostgreSQL client backends by state.",
                labels=["datname", "application_name", "state"],
            ),
            GaugeMetricFamily(
                PREFIX + "pg_idle_in_transaction_max_seconds",
                "Longest time a backend has been idle in transaction (now - state_change).",
                labels=["datname", "application_name"],
            ),
            GaugeMetricFamily(
                PREFIX + "pg_transaction_max_age_seconds",
                "Age of the oldest open transaction (now - xact_start).",
                labels=["datname", "application_name", "state"],
            ),
        ]
        if self.orphans:
            families.append(GaugeMetricFamily(
                PREFIX + "pg_orphaned_transactions",
                "Backends idle in transaction that a pool of this process (pg-exporter "
                "--redis-url: of the fleet) holds for a request that ended (a leak) or whose "
                "client disconnected.",
                labels=["datname", "application_name", "owner"],
            ))
        families += [
            GaugeMetricFamily(
                PREFIX + "pg_idle_in_transaction_session_timeout_seconds",
                "The server's idle_in_transaction_session_timeout (0: disabled).",
            ),
            GaugeMetricFamily(PREFIX + "pg_up", "1 when the last pg_stat_activity scrape worked."),
        ]
        return families

    def _build(self, rows: list[Row]) -> list[GaugeMetricFamily]:
        backends: dict[tuple[str, str, str], int] = {}
        idle_max: dict[tuple[str, str], float] = {}
        xact_max: dict[tuple[str, str, str], float] = {}
        orphaned: dict[tuple[str, str, str], int] = {}
        apps: set[str] = set()
        timeout = 0.0
        owned = checkouts.by_pid() if self.orphans else {}
        claims = (
            self.claims.find([(r[0], r[3]) for r in rows if r[2] in _IDLE_IN_TRANSACTION])
            if self.claims is not None
            else {}
        )
        seen: set[tuple[int, int, str]] = set()
        for datname, app_name, state_or_none, pid, since_change, xact_age, timeout_s in rows:
            timeout = timeout_s or 0.0
            app = app_name
            if app not in apps:
                if len(apps) >= MAX_APPLICATION_NAMES:
                    app = OTHER
                apps.add(app)
            state = state_or_none or "unknown"
            key = (datname, app, state)
            backends[key] = backends.get(key, 0) + 1
            pair = (datname, app)
            idle_max.setdefault(pair, 0.0)
            if xact_age is not None:
                xact_max[key] = max(xact_max.get(key, 0.0), xact_age)
            if state not in _IDLE_IN_TRANSACTION:
                continue
            idle_max[pair] = max(idle_max[pair], since_change or 0.0)
            conn = owned.get(pid)
            owner_state = conn.owner if conn is not None else None
            if owner_state is None:
                if claims:
                    claim = claims.get((datname, pid))
                    if claim is not None:
                        okey = (datname, app, claim.owner)
                        orphaned[okey] = orphaned.get(okey, 0) + 1
                        report_key = (pid, claim.id, claim.owner)
                        seen.add(report_key)
                        if report_key not in self._reported:
                            self._report_claim(claim, pid, since_change or 0.0, datname)
                continue
            if owner_state.ended:
                owner = "ended"
            elif owner_state.detected_perf is not None:
                owner = "disconnected"
            else:
                continue
            okey = (datname, app, owner)
            orphaned[okey] = orphaned.get(okey, 0) + 1
            report_key = (pid, id(owner_state), owner)
            seen.add(report_key)
            if report_key not in self._reported:
                self._report(owner_state, pid, owner, since_change or 0.0, datname)
        self._reported = seen
        if self.claims is not None:
            present: dict[str, set[int]] = {}
            for r in rows:
                pids = present.get(r[0])
                if pids is None:
                    pids = present[r[0]] = set()
                pids.add(r[3])
            self.claims.prune(present, self._query_started)
        families = self._families()
        b, idle, xact = families[0], families[1], families[2]
        for key, count in backends.items():
            b.add_metric(list(key), count)
        for pair, seconds in idle_max.items():
            idle.add_metric(list(pair), seconds)
        for key, seconds in xact_max.items():
            xact.add_metric(list(key), seconds)
        if self.orphans:
            for pair in idle_max:
                for owner in OWNERS:
                    families[3].add_metric([*pair, owner], orphaned.get((*pair, owner), 0))
        families[-2].add_metric([], timeout)
        families[-1].add_metric([], 1)
        return families

    def _report_claim(self, claim: Any, pid: int, idle_s: float, datname: str) -> None:
        """Once per orphan another process of the fleet told us about: a log line."""
        logger.warning(
            "orphaned transaction: backend pid %d on %r idle in transaction for %.1fs, held by a "
            "request that %s in %s (route %s, trace_id %s)",
            pid, datname, idle_s, "ended" if claim.owner == "ended" else "lost its client",
            claim.origin, claim.route or "unmatched", claim.trace_id or "-",
        )

    def _report(self, owner: Any, pid: int, kind: str, idle_s: float, datname: str) -> None:
        """Once per orphan: a log line with the trace id, and an event on the span if it records."""
        span = owner.span
        trace_id = trace_id_hex(span)
        logger.warning(
            "orphaned transaction: backend pid %d on %r idle in transaction for %.1fs, held by a "
            "request that %s (route %s, trace_id %s)",
            pid, datname, idle_s, "ended" if kind == "ended" else "lost its client",
            owner.route or "unmatched", trace_id or "-",
        )
        spans.add_event(
            span, spans.EVENT_DB_TRANSACTION_ORPHANED,
            {spans.DB_BACKEND_PID: pid, spans.DB_ORPHAN_OWNER: kind,
             spans.DB_IDLE_IN_TRANSACTION_S: idle_s},
            time.time_ns(),
        )
