"""The reference design the README's Performance section measures against: a reader task each.

A pure ASGI middleware that starts an asyncio task calling ``receive()`` until ``http.disconnect``,
hands the messages it read to the app through a queue, and cancels the task when the app returns.
It is what most disconnect middlewares do; it exists here only as the yardstick for
otel-disconnect's task-free read-ahead.
"""

from __future__ import annotations

import asyncio
from typing import Any

Message = dict[str, Any]


class NaiveDisconnectMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Read the server's own receive, as otel-disconnect does: the OpenTelemetry wrapper would
        # add a "receive" span per request and charge this design for a span, not for its task.
        raw = getattr(receive, "__wrapped__", receive)
        queue: asyncio.Queue[Message] = asyncio.Queue()
        disconnected = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await raw()
                queue.put_nowait(message)
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return

        task = asyncio.get_running_loop().create_task(watch())
        scope["naive.disconnected"] = disconnected  # what an app would wait on
        try:
            await self.app(scope, queue.get, send)
        finally:
            task.cancel()
