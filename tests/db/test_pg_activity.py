"""PgActivityCollector and ``otel-disconnect pg-exporter`` against a PostgreSQL of their own.

Their own server, because one test stops it to prove the exporter keeps serving while it is down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from otel_disconnect.db.pg_activity import PgActivityCollector

from ..servers import free_port, wait_for
from .pg import EmbeddedPostgres

APP = "od-collector-test"
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def pg() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(settings={"idle_in_transaction_session_timeout": f"{TIMEOUT_S}s"})
    try:
        server.start()
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE ROLE monitor LOGIN")
            conn.execute("GRANT pg_monitor TO monitor")
        yield server
    finally:
        server.destroy()


@pytest.fixture
def sessions(pg: EmbeddedPostgres) -> Iterator[list[Any]]:
    """Two sessions idle in transaction and one idle, all with application_name APP."""
    conns = [psycopg.connect(pg.dsn, application_name=APP) for _ in range(3)]
    for conn in conns[:2]:
        conn.execute("SELECT 1")  # psycopg opens a transaction and leaves it open
    conns[2].autocommit = True
    conns[2].execute("SELECT 1")
    yield conns
    for conn in conns:
        conn.close()


def _direct(pg: EmbeddedPostgres) -> tuple[float, float]:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT max(extract(epoch FROM now() - state_change))::float8,"
            " max(extract(epoch FROM now() - xact_start))::float8 FROM pg_stat_activity"
            " WHERE application_name = %s AND state = 'idle in transaction'", (APP,),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.parametrize("user", ["postgres", "monitor"])
def test_gauges_match_pg_stat_activity(
    pg: EmbeddedPostgres, sessions: list[Any], user: str
) -> None:
    registry = CollectorRegistry()
    collector = PgActivityCollector(pg.dsn.replace("user=postgres", f"user={user}"),
                                    registry=registry)
    try:
        time.sleep(0.05)  # let the sessions' ages become measurably positive
        before_idle, before_xact = _direct(pg)
        output = generate_latest(registry).decode()  # one scrape, every series from it
        after_idle, after_xact = _direct(pg)
    finally:
        collector.close()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(output) for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        labels = {"datname": "postgres", "application_name": APP, **labels}
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("otel_disconnect_pg_backends", state="idle in transaction") == 2
    assert value("otel_disconnect_pg_backends", state="idle") == 1
    idle = value("otel_disconnect_pg_idle_in_transaction_max_seconds")
    assert before_idle <= idle <= after_idle
    xact = value("otel_disconnect_pg_transaction_max_age_seconds", state="idle in transaction")
    assert before_xact <= xact <= after_xact
    # Nothing in this process holds those backends: no orphans.
    assert value("otel_disconnect_pg_orphaned_transactions", owner="ended") == 0
    assert "otel_disconnect_pg_idle_in_transaction_session_timeout_seconds " + str(
        float(TIMEOUT_S)) in output
    assert "otel_disconnect_pg_up 1.0" in output


def test_its_own_session_is_bounded_and_never_in_a_transaction(pg: EmbeddedPostgres) -> None:
    collector = PgActivityCollector(pg.dsn, registry=CollectorRegistry(), statement_timeout_s=1.5)
    try:
        list(collector.collect())
        conn = collector._conn
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "1500ms"
        assert conn.autocommit is True
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        collector.close()


def test_keeps_serving_while_postgres_is_down(pg: EmbeddedPostgres) -> None:
    registry = CollectorRegistry()
    collector = PgActivityCollector(pg.dsn, registry=registry, connect_timeout_s=1)
    try:
        assert _value(registry, "otel_disconnect_pg_up") == 1
        pg.stop()
        try:
            started = time.monotonic()
            output = generate_latest(registry).decode()  # no exception reaches the scrape
            assert time.monotonic() - started < 5
            assert "otel_disconnect_pg_up 0.0" in output
            assert "otel_disconnect_pg_backends{" not in output
        finally:
            pg.start()
        wait_for(lambda: _value(registry, "otel_disconnect_pg_up") == 1, timeout=20)
    finally:
        collector.close()


def test_pg_exporter_command(pg: EmbeddedPostgres, sessions: list[Any]) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "otel_disconnect", "pg-exporter", "--dsn", pg.dsn,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return str(r.read().decode())
            except OSError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                return None

        output = wait_for(scrape, timeout=30)
        assert "otel_disconnect_pg_up 1.0" in output
        assert (f'otel_disconnect_pg_backends{{application_name="{APP}",datname="postgres",'
                f'state="idle in transaction"}} 2.0') in output
        assert "otel_disconnect_pg_orphaned_transactions" not in output  # no pool in there
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


# -- where the engine connects, the collector connects -----------------------------------------

URL_CASES = [
    (
        "postgresql+asyncpg://u:p%40ss@db:5433/app?ssl=require&prepared_statement_cache_size=0",
        {"host": "db", "port": "5433", "dbname": "app", "user": "u", "password": "p@ss",
         "sslmode": "require"},
    ),
    ("postgresql+psycopg://u@/app?host=/run/postgresql",
     {"host": "/run/postgresql", "dbname": "app", "user": "u"}),
    (
        "postgresql+psycopg://u@/app?host=db1:5432&host=db2:5433&target_session_attrs=read-write",
        {"host": "db1,db2", "port": "5432,5433", "dbname": "app", "user": "u",
         "target_session_attrs": "read-write"},
    ),
    (
        "postgresql://u@[::1]:5432/app?sslmode=verify-full&sslrootcert=/ca.pem&client_encoding=utf8",
        {"host": "::1", "port": "5432", "dbname": "app", "user": "u", "sslmode": "verify-full",
         "sslrootcert": "/ca.pem", "client_encoding": "utf8"},
    ),
    ("postgresql+psycopg://u@/app?host=/tmp/pg&port=6000",
     {"host": "/tmp/pg", "port": "6000", "dbname": "app", "user": "u"}),
]


@pytest.mark.parametrize(("url", "expected"), URL_CASES, ids=[u for u, _ in URL_CASES])
def test_engine_urls_become_libpq_parameters(url: str, expected: dict[str, str]) -> None:
    from sqlalchemy.engine import make_url

    from otel_disconnect.db.libpq_url import conninfo, conninfo_params

    assert conninfo_params(make_url(url)) == expected
    parsed = psycopg.conninfo.conninfo_to_dict(conninfo(make_url(url)))
    assert parsed == expected


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_collector_follows_an_engine_on_a_unix_socket(driver: str) -> None:
    """A PostgreSQL that listens on a Unix socket only, as many hosts run it."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    server = EmbeddedPostgres(tcp=False)
    try:
        server.start()
        url = (
            f"postgresql+{driver}://postgres@/postgres"
            f"?host={server.socket_dir}&port={server.port}"
        )
        engine: Any = create_async_engine(url) if driver == "asyncpg" else create_engine(url)
        with pytest.raises(psycopg.OperationalError):  # no TCP listener
            psycopg.connect(f"host=127.0.0.1 port={server.port} user=postgres", connect_timeout=2)
        collector = PgActivityCollector(engine, registry=CollectorRegistry())
        try:
            up = {m.name: m for m in collector.collect()}["otel_disconnect_pg_up"]
            assert up.samples[0].value == 1
        finally:
            collector.close()
    finally:
        server.destroy()
