"""The database scenarios as FastAPI endpoints: each way a request leaves a transaction behind."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker

from otel_disconnect import instrument_app

from ..apps import Signals

PID = text("SELECT pg_backend_pid()")
# A row written inside the transaction: it survives only if the transaction commits.
INSERT = text("INSERT INTO od_items (app) VALUES (current_setting('application_name'))")


def build_db_app(
    signals: Signals, engine: AsyncEngine | None = None, sync_engine: Any = None, **options: Any
) -> FastAPI:
    app = FastAPI()
    leaked: list[Any] = []
    app.state.leaked = leaked
    engines: list[Any] = [e for e in (engine, sync_engine) if e is not None]

    if engine is not None:
        Session = async_sessionmaker(engine)

        @app.get("/tx-stream")
        async def tx_stream() -> StreamingResponse:
            # 1. A stream inside `async with session.begin()`, cancelled between chunks.
            async def body() -> Any:
                async with Session() as session, session.begin():
                    pid = (await session.execute(PID)).scalar_one()
                    await session.execute(INSERT)
                    yield b"first\n"
                    signals.set("tx_stream.in_tx", pid)
                    await asyncio.sleep(60)
                    yield b"never\n"

            return StreamingResponse(body(), media_type="text/plain")

        @app.get("/slow-upstream")
        async def slow_upstream() -> dict[str, Any]:
            # 2. Not streaming: a transaction open across a slow upstream call the client left.
            upstream = asyncio.Event()
            signals.set("upstream.event", upstream)
            async with Session() as session, session.begin():
                pid = (await session.execute(PID)).scalar_one()
                signals.set("upstream.in_tx", pid)
                await asyncio.wait_for(upstream.wait(), timeout=30)
            return {"pid": pid}

        @app.get("/leak-stream")
        async def leak_stream() -> StreamingResponse:
            # 3. A connection checked out without a context manager and never returned.
            async def body() -> Any:
                conn = await engine.connect()
                leaked.append(conn)
                await conn.begin()
                pid = (await conn.execute(PID)).scalar_one()
                yield b"first\n"
                signals.set("leak.in_tx", pid)
                await asyncio.sleep(60)
                yield b"never\n"

            return StreamingResponse(body(), media_type="text/plain")

        @app.get("/running-stream")
        async def running_stream() -> StreamingResponse:
            # 4. Cancelled while a statement runs.
            async def body() -> Any:
                async with engine.connect() as conn:
                    pid = (await conn.execute(PID)).scalar_one()
                    yield b"first\n"
                    signals.set("running.pid", pid)
                    await conn.execute(text("SELECT pg_sleep(30)"))
                    yield b"never\n"

            return StreamingResponse(body(), media_type="text/plain")

    if sync_engine is not None:
        SyncSession = sessionmaker(sync_engine)

        @app.get("/sync-tx")
        def sync_tx() -> dict[str, Any]:
            # 5. A sync session in a `def` endpoint (thread pool) whose client left.
            with SyncSession() as session, session.begin():
                pid = session.execute(PID).scalar_one()
                session.execute(INSERT)
                signals.set("sync.in_tx", pid)
                released = signals.event("sync.release").wait(30)
            return {"pid": pid, "released": released}

    instrument_app(app, engines=engines, **options)
    return app
