"""The sample apps the server tests run: every way an ASGI app meets a disconnect."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.middleware.base import BaseHTTPMiddleware

from otel_disconnect import RequestView, client_state, current, instrument_app
from otel_disconnect.cancel import protect


class Signals:
    """Thread-safe flags the handlers raise so the test thread knows where the request is."""

    def __init__(self) -> None:
        self.events: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.values: dict[str, Any] = {}

    def event(self, name: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault(name, threading.Event())

    def set(self, name: str, value: Any = True) -> None:
        self.values[name] = value
        self.event(name).set()

    def wait(self, name: str, timeout: float = 10.0) -> Any:
        assert self.event(name).wait(timeout), f"handler never reached {name!r}"
        return self.values.get(name)


class AddHeader(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-base-http"] = "1"
        return response


def build_app(
    signals: Signals,
    *,
    instrument: bool = True,
    base_http: str | None = None,
    **options: Any,
) -> FastAPI:
    """``base_http``: None, "inner" (BaseHTTPMiddleware inside ours) or "outer" (outside it)."""
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/slow")
    async def slow(state: RequestView = Depends(client_state)) -> dict[str, Any]:
        # Never calls receive(): only the middleware's read-ahead can see the client leave.
        signals.set("slow.started")
        try:
            await asyncio.wait_for(state.wait_disconnected(), timeout=10)
        except asyncio.TimeoutError:
            return {"disconnected": False}
        signals.set("slow.saw_disconnect", current() is state)
        await asyncio.sleep(0.05)  # work after the disconnect
        return {"disconnected": True}

    @app.get("/sleep")
    async def sleep(seconds: float = 0.3) -> dict[str, float]:
        signals.set("sleep.started")
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @app.post("/upload")
    async def upload(request: Request, work: float = 0.0) -> dict[str, int]:
        signals.set("upload.started")
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            signals.set("upload.bytes", size)
        if work:  # then work before answering, as an LLM endpoint waits for its first token
            await asyncio.sleep(work)
            signals.set("upload.finished")
        return {"size": size}

    @app.get("/stream")
    async def stream(chunks: int = 200, interval: float = 0.02) -> StreamingResponse:
        async def body() -> Any:
            for i in range(chunks):
                signals.set("stream.sent", i + 1)
                yield f"chunk {i}\n".encode()
                await asyncio.sleep(interval)

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/sse")
    async def sse(chunks: int = 200, interval: float = 0.02) -> Any:
        from sse_starlette import EventSourceResponse

        async def events() -> Any:
            for i in range(chunks):
                signals.set("sse.sent", i + 1)
                yield {"data": f"event {i}"}
                await asyncio.sleep(interval)

        return EventSourceResponse(events(), ping=3600)

    @app.get("/work")
    async def work(seconds: float = 5.0) -> dict[str, float]:
        signals.set("work.started")
        await asyncio.sleep(seconds)
        signals.set("work.finished")
        return {"worked": seconds}

    @app.get("/protected")
    async def protected(seconds: float = 0.3) -> dict[str, bool]:
        signals.set("protected.started")
        async with protect("commit"):
            signals.set("protected.entered")
            await asyncio.sleep(seconds)
            signals.set("protected.committed")
        signals.set("protected.after_block")
        await asyncio.sleep(seconds)
        signals.set("protected.finished")
        return {"ok": True}

    @app.get("/tokens")
    async def tokens(n: int = 60, interval: float = 0.02) -> StreamingResponse:
        counts = {"generated": 0, "after": 0}
        signals.set("tokens.counts", counts)

        async def body() -> Any:
            state = current()
            for i in range(n):
                await asyncio.sleep(interval)  # the engine producing token i
                counts["generated"] += 1
                if state is not None and state.disconnected:
                    counts["after"] += 1
                yield f"tok{i} ".encode()

        return StreamingResponse(body(), media_type="text/plain")

    @app.post("/generate")
    async def generate(request: Request, seconds: float = 0.5) -> dict[str, int]:
        body = await request.body()
        signals.set("generate.started")
        await asyncio.sleep(seconds)
        return {"size": len(body)}

    @app.get("/headers")
    async def headers() -> JSONResponse:
        return JSONResponse({"a": [1, 2, 3]}, headers={"x-custom": "yes"}, status_code=201)

    if base_http == "inner":
        app.add_middleware(AddHeader)
    if instrument:
        instrument_app(app, **options)
    if base_http == "outer":
        app.add_middleware(AddHeader)
    return app
