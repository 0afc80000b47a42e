"""Two app processes and one standalone ``otel-disconnect pg-exporter --redis-url`` on a real
PostgreSQL: a transaction held by a request whose client left (one process: begun before the
client left, or only after it) or left open by a request that ended (the other) appears in the
exporter's orphan series with the right owner within one scrape after the exporter heard the
event, is logged once with its trace id, and disappears when the backend goes."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..db.conftest import driver_url
from ..multiproc_server import scrape, value
from ..servers import RawClient, free_port, wait_for
from .redis_server import RedisServer
from .workers import ROOT, fleet_app

pytest.importorskip("psycopg")


@contextlib.contextmanager
def exporter(pg_url: str, redis_url: str, log: Path) -> Iterator[int]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "otel_disconnect", "pg-exporter", "--dsn", pg_url,
             "--host", "127.0.0.1", "--port", str(port), "--redis-url", redis_url],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out,
        )
        try:
            wait_for(lambda: scrape(port), timeout=60)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def backend(pg_url: str, app_name: str) -> tuple[int, str, str] | None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        ).fetchone()
    return (int(row[0]), str(row[1]), str(row[2])) if row else None


def in_request_transaction(pg_url: str, app_name: str) -> tuple[int, str, str] | None:
    """The backend once the request's own statement ran in its transaction. Not just "idle in
    transaction": SQLAlchemy's first connect runs its own queries in a transaction, before the
    pool hands the connection to the request."""
    b = backend(pg_url, app_name)
    return b if b and b[1] == "idle in transaction" and "pg_backend_pid" in b[2] else None


def terminate(pg_url: str, pid: int) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def orphans(port: int, app_name: str, owner: str) -> float:
    return value(
        scrape(port), "otel_disconnect_pg_orphaned_transactions",
        f'application_name="{app_name}",datname="postgres",owner="{owner}"',
    )


def heard(port: int) -> float:
    return value(scrape(port), "otel_disconnect_fleet_events_received_total", 'kind="orphan"')


@pytest.mark.timeout(300)
def test_orphans_of_two_processes_in_one_exporter(
    pg_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    common = {
        "OTEL_DISCONNECT_REDIS_URL": redis_server.url,
        "FLEET_TEST_PG_URL": driver_url(pg_url, "asyncpg"),
        "FLEET_TEST_TRACING": "1",
    }
    log = tmp_path / "exporter.log"
    with (
        exporter(pg_url, redis_server.url, log) as port,
        fleet_app(tmp_path / "a", 1, FLEET_TEST_APP_NAME="fleet-a", **common) as app_a,
        fleet_app(tmp_path / "b", 1, FLEET_TEST_APP_NAME="fleet-b", **common) as app_b,
    ):
        wait_for(lambda: value(scrape(port), "otel_disconnect_fleet_channel_up") == 1, 30)
        for app_port in (app_a, app_b):
            wait_for(lambda p=app_port: value(scrape(p), "otel_disconnect_fleet_channel_up"), 30)
        # Process a: the client leaves while its request holds a transaction.
        with RawClient(app_a) as client:
            client.request("GET", "/hold_tx")
            pid_a = wait_for(lambda: in_request_transaction(pg_url, "fleet-a"), timeout=30)[0]
        wait_for(lambda: heard(port) >= 1, 30)
        assert orphans(port, "fleet-a", "disconnected") == 1  # the next scrape has it
        assert orphans(port, "fleet-a", "ended") == 0
        # Still process a: the client leaves first, the zombie request begins its transaction
        # after that (nothing held at detection): claimed when the transaction begins.
        with RawClient(app_a) as client:
            client.request("GET", "/late_tx")
            wait_for(lambda: value(scrape(app_a), "otel_disconnect_inflight_requests",
                                   'client="connected"') == 1, 30)
        pid_late = wait_for(lambda: in_request_transaction(pg_url, "fleet-a-late"), 30)[0]
        wait_for(lambda: heard(port) >= 2, 30)
        assert orphans(port, "fleet-a-late", "disconnected") == 1
        assert orphans(port, "fleet-a", "disconnected") == 1
        # Process b: a request ends and leaves its transaction open (a leak).
        with RawClient(app_b) as client:
            client.request("GET", "/leak_tx", headers={"Connection": "close"})
            client.read_all()
        pid_b = wait_for(lambda: backend(pg_url, "fleet-b"), timeout=30)[0]
        wait_for(lambda: heard(port) >= 3, 30)
        assert orphans(port, "fleet-b", "ended") == 1
        assert orphans(port, "fleet-a", "disconnected") == 1
        # Scraped again and again, each orphan is logged once, with its trace id.
        for _ in range(3):
            scrape(port)
        text = log.read_text()
        for pid, route in ((pid_a, "/hold_tx"), (pid_late, "/late_tx"), (pid_b, "/leak_tx")):
            lines = [line for line in text.splitlines() if f"backend pid {pid} " in line]
            assert len(lines) == 1, text
            assert f"route {route}" in lines[0] and re.search(r"trace_id [0-9a-f]{32}", lines[0])
        # The backends go: so do the series (and the exporter's claims).
        names = ("fleet-a", "fleet-a-late", "fleet-b")
        for pid in (pid_a, pid_late, pid_b):
            terminate(pg_url, pid)
        wait_for(lambda: all(backend(pg_url, name) is None for name in names))
        assert orphans(port, "fleet-a", "disconnected") == 0
        assert orphans(port, "fleet-a-late", "disconnected") == 0
        assert orphans(port, "fleet-b", "ended") == 0
