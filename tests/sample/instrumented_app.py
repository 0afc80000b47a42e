"""A FastAPI app instrumented with one line, for subprocess tests (multi-process mode)."""

import asyncio
import os

from fastapi import FastAPI

from otel_disconnect import instrument_app

app = FastAPI()


@app.get("/hello")
async def hello() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/slow")
async def slow() -> dict[str, bool]:
    await asyncio.sleep(1.0)
    return {"done": True}


instrument_app(app)
