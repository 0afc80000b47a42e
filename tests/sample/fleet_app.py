"""A FastAPI app for ``uvicorn --workers N`` on the fleet channel (subprocess tests).

``OTEL_DISCONNECT_REDIS_URL`` turns the channel on; ``FLEET_TEST_LOG`` names a file where every
request appends "pid attempt" when it starts, so a test knows which worker served which attempt;
``FLEET_TEST_QUEUE_MAX`` bounds the fleet's publish queue.
With ``FLEET_TEST_PG_URL`` (an asyncpg URL) ``/hold_tx`` opens a transaction and waits (a
disconnected owner), ``/late_tx`` opens one only after its client left, and ``/leak_tx`` opens
one and returns without closing it (an ended owner).
"""

import asyncio
import os
from typing import Any

from fastapi import FastAPI, Request
from sqlalchemy import text

from otel_disconnect import current, instrument_app

app = FastAPI()
LOG = os.environ.get("FLEET_TEST_LOG")
engines: list[Any] = []
leaked = []  # connections a request left checked out, kept alive on purpose


def _log(attempt: str) -> None:
    # One short appended line per request: cheaper than a thread hop, and the test needs it
    # written before the request sleeps.
    if LOG:
        with open(LOG, "a") as log:
            log.write(f"{os.getpid()} {attempt}\n")


@app.post("/generate")
async def generate(request: Request, seconds: float = 0.9) -> dict[str, int]:
    body = await request.body()
    _log(request.headers.get("x-attempt", "-"))
    await asyncio.sleep(seconds)
    return {"size": len(body)}


if os.environ.get("FLEET_TEST_PG_URL"):
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(
        os.environ["FLEET_TEST_PG_URL"],
        connect_args={"server_settings": {"application_name": os.environ["FLEET_TEST_APP_NAME"]}},
    )
    # A second engine, so the test tells this backend from /hold_tx's by its application_name.
    late_engine = create_async_engine(
        os.environ["FLEET_TEST_PG_URL"],
        connect_args={
            "server_settings": {"application_name": os.environ["FLEET_TEST_APP_NAME"] + "-late"}
        },
    )
    engines += [engine, late_engine]

    @app.get("/hold_tx")
    async def hold_tx() -> dict[str, int]:
        async with engine.connect() as conn:
            await conn.begin()
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await asyncio.sleep(3600)  # the client leaves; this request keeps its transaction
            return {"pid": pid}

    @app.get("/late_tx")
    async def late_tx() -> dict[str, int]:
        state = current()
        assert state is not None
        await state.wait_disconnected()  # the transaction begins only after the client left
        async with late_engine.connect() as conn:
            await conn.begin()
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await asyncio.sleep(3600)
            return {"pid": pid}

    @app.get("/leak_tx")
    async def leak_tx() -> dict[str, int]:
        conn = await engine.connect()
        await conn.begin()
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        leaked.append(conn)  # never closed: the request ends, the transaction stays
        return {"pid": pid}


if os.environ.get("FLEET_TEST_TRACING"):  # spans with real trace ids, exported nowhere
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())

if os.environ.get("FLEET_TEST_QUEUE_MAX"):  # a small publish queue, filled by a short outage
    from otel_disconnect.fleet import channel

    channel.QUEUE_MAX = int(os.environ["FLEET_TEST_QUEUE_MAX"])

instrument_app(app, engines=engines)
