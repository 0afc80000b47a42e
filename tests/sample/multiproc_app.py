"""A FastAPI app for ``uvicorn --workers 2`` with ``PROMETHEUS_MULTIPROC_DIR`` (subprocess tests).

With ``OTEL_DISCONNECT_TEST_PG_DSN`` set, each worker registers a ``PgActivityCollector``.
"""

import asyncio
import os

from fastapi import FastAPI

from otel_disconnect import instrument_app
from otel_disconnect.db import PgActivityCollector

app = FastAPI()


@app.get("/hello")
async def hello() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/hold")
async def hold() -> dict[str, bool]:
    await asyncio.Event().wait()  # until the worker dies
    return {"done": True}


if os.environ.get("OTEL_DISCONNECT_TEST_PG_DSN"):
    PgActivityCollector(os.environ["OTEL_DISCONNECT_TEST_PG_DSN"], application_name="mp-test")

instrument_app(app)
