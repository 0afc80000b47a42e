"""An unchanged FastAPI app: no otel-disconnect import. ``opentelemetry-instrument`` adds it."""

import asyncio

from fastapi import FastAPI

app = FastAPI()


@app.get("/slow")
async def slow() -> dict[str, bool]:
    await asyncio.sleep(1.0)
    return {"done": True}


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
