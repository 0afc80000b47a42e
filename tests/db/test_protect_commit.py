"""protect() around a commit: the client leaves mid-COMMIT, the commit completes, then the
request is cancelled and nothing is left idle in transaction (real PostgreSQL, real server)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from otel_disconnect import instrument_app, protect

from ..apps import Signals
from ..conftest import Telemetry
from ..servers import RawClient, serve, wait_for
from .conftest import ASYNC_DRIVERS, Activity, make_engine

# A deferred constraint trigger runs at COMMIT: it makes the commit itself take 0.5 s.
SLOW_COMMIT_DDL = """
CREATE TABLE IF NOT EXISTS od_commits (app text NOT NULL);
CREATE OR REPLACE FUNCTION od_slow_commit() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$;
DROP TRIGGER IF EXISTS od_slow_commit ON od_commits;
CREATE CONSTRAINT TRIGGER od_slow_commit AFTER INSERT ON od_commits
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION od_slow_commit();
"""


@pytest.fixture(scope="module")
def slow_commit_table(pg_url: str) -> str:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(SLOW_COMMIT_DDL)
    return "od_commits"


@pytest.fixture(params=ASYNC_DRIVERS)
def engine(
    request: pytest.FixtureRequest, pg_url: str, app_name: str, activity: Activity,
    slow_commit_table: str,
) -> Iterator[Any]:
    engine = make_engine(pg_url, str(request.param), app_name)
    yield engine
    activity.terminate(app_name)
    engine.sync_engine.dispose(close=False)


def build(signals: Signals, engine: Any, telemetry: Telemetry) -> FastAPI:
    app = FastAPI()
    Session = async_sessionmaker(engine)

    @app.post("/orders")
    async def create_order() -> dict[str, bool]:
        async with Session() as session:
            async with protect("commit"):
                async with session.begin():
                    await session.execute(text(
                        "INSERT INTO od_commits (app) VALUES (current_setting('application_name'))"
                    ))
                    signals.set("order.committing")  # leaving this block runs COMMIT (0.5 s)
                signals.set("order.committed")  # COMMIT returned, still inside protect()
            await asyncio.sleep(10)  # never: the cancellation is delivered as protect() exits
            signals.set("order.finished")
        return {"ok": True}

    instrument_app(app, engines=[engine], cancel_on_disconnect=True, **telemetry.options())
    return app


def test_commit_inside_protect_completes_then_the_request_is_cancelled(
    engine: Any, app_name: str, activity: Activity, telemetry: Telemetry
) -> None:
    signals = Signals()
    with serve(build(signals, engine, telemetry), "uvicorn-httptools") as server:
        with RawClient(server.port) as client:
            client.request("POST", "/orders", body=b"{}")
            signals.wait("order.committing")
        # The client is gone while COMMIT runs.
        span = wait_for(lambda: next((s for s in telemetry.server_spans()
                                      if s.attributes.get("http.route") == "/orders"), None))
    attrs = span.attributes
    assert attrs["disconnect.protected_section"] == "commit"
    assert attrs["disconnect.outcome"] == "cancelled"
    # Detected while COMMIT was in flight: the hooks saw the commit start and not yet return.
    assert attrs["disconnect.db.transaction_state"] == "committing"
    [event] = [e for e in span.events if e.name == "db.transaction.interrupted"]
    assert event.attributes["disconnect.db.transaction_state"] == "committing"
    assert event.attributes["disconnect.db.statement_running"] is False
    assert telemetry.value(
        "otel_disconnect_db_transactions_interrupted_total", route="/orders", state="committing"
    ) == 1
    assert signals.event("order.committed").is_set()
    assert not signals.event("order.finished").is_set()
    row = activity.conn.execute(
        "SELECT count(*) FROM od_commits WHERE app = %s", (app_name,)).fetchone()
    assert row is not None and row[0] == 1  # the commit completed
    assert "idle in transaction" not in activity.states(app_name)
    assert telemetry.value("otel_disconnect_db_checkins_total", outcome="clean") == 1
