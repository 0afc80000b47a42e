"""guard_stream(): cleanup exactly once, whichever path ends the stream, 500 times each."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from otel_disconnect import DisconnectMiddleware, current
from otel_disconnect.cancel import guard_stream

REPEAT = 500


class Server:
    """A uvicorn-like server side: the client leaves after ``leave_after`` body chunks."""

    def __init__(self, leave_after: int | None) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        self.leave_after = leave_after
        self.chunks = 0

    async def receive(self) -> dict[str, Any]:
        return await self.queue.get()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            self.chunks += 1
            if self.chunks == self.leave_after:
                self.queue.put_nowait({"type": "http.disconnect"})


Server.__module__ = "uvicorn.protocols.http.fake"  # read ahead without a task, as for uvicorn


def build(path: str, closes: list[str]) -> Any:
    async def endpoint(request: Request) -> StreamingResponse:
        async def tokens() -> Any:
            state = current()
            for i in range(10_000):
                if path in ("app_break", "race") and state is not None and state.disconnected:
                    break
                if path == "error" and i == 2:
                    raise ValueError("engine failed")
                if path == "completed" and i == 3:
                    return
                yield f"tok{i} "
                await asyncio.sleep(0)

        async def on_close(end: str) -> None:
            await asyncio.sleep(0)  # an async cleanup, so a cancellation could hit it
            closes.append(end)

        return StreamingResponse(guard_stream(tokens(), on_close=on_close))

    app = Starlette(routes=[Route("/", endpoint)])
    return DisconnectMiddleware(app, registry=CollectorRegistry())


SCENARIOS = {
    # path: (client leaves after n chunks, ASGI spec version, allowed ends)
    "completed": (None, "2.3", {"completed"}),
    # Starlette's disconnect listener cancels the stream (spec 2.3).
    "client_disconnect": (2, "2.3", {"client_disconnect"}),
    # Spec 2.4: Starlette runs no listener; only the app's own check stops it.
    "app_break": (2, "2.4", {"app_break"}),
    "error": (None, "2.3", {"error"}),
    # The app's break and the framework's cancellation race.
    "race": (2, "2.3", {"app_break", "client_disconnect"}),
}


@pytest.mark.parametrize("path", sorted(SCENARIOS))
async def test_cleanup_runs_exactly_once(path: str) -> None:
    leave_after, spec, allowed = SCENARIOS[path]
    ends: Counter[str] = Counter()
    for _ in range(REPEAT):
        closes: list[str] = []
        app = build(path, closes)
        server = Server(leave_after)
        scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/",
                 "query_string": b"", "headers": [], "root_path": "",
                 "asgi": {"version": "3.0", "spec_version": spec}}
        try:
            await app(scope, server.receive, server.send)
        except ValueError:
            assert path == "error"
        assert len(closes) == 1, closes
        ends[closes[0]] += 1
    assert set(ends) <= allowed, ends
    assert sum(ends.values()) == REPEAT
