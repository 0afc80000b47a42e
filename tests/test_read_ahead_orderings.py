"""Nothing the read-ahead takes from the server is lost, in every ordering of "a read finished"
and "the final body was sent" (or "the app ended"), on both read paths: the driven one (a
server's own receive(), stepped without a task) and the Task one (any other receive()).

The fake server here is the strict kind: it hands each message over in the result of the future
its receive() awaits (as Granian's does), so a read that finished is a message already taken from
the server: if the middleware drops it, the app never sees it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from otel_disconnect import DisconnectMiddleware, current
from otel_disconnect.state import RequestState

Message = dict[str, Any]


class Lost(AssertionError):
    pass


class FutureServer:
    """receive() awaits a future whose result is the message; send() records what it got."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[Message]] = []
        self.queued: list[Message] = []
        self.given: list[Message] = []  # every message a receive() call returned
        self.sent: list[Message] = []
        self.exhausted = False  # nothing more will come: a receive() now means a lost message

    async def receive(self) -> Message:
        if self.queued:
            message = self.queued.pop(0)
        else:
            if self.exhausted:
                raise Lost("the app asked for a message the server had already handed over")
            future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            self.waiting.append(future)
            message = await future
        self.given.append(message)
        return message

    def deliver(self, message: Message) -> None:
        while self.waiting:
            future = self.waiting.pop(0)
            if not future.done():  # a withdrawn read is cancelled, as asyncio's queues skip it
                future.set_result(message)
                return
        self.queued.append(message)

    async def send(self, message: Message) -> None:
        self.sent.append(message)


class DrivenFutureServer(FutureServer):
    """Named like a uvicorn class, so its receive() is driven without a task."""


DrivenFutureServer.__module__ = "uvicorn.protocols.http.fake_future"

SERVERS = {"driven": DrivenFutureServer, "task": FutureServer}

# When the raced read finishes, relative to the app's final send:
#   earlier:   several loop turns before (the pump has buffered it)
#   one_turn:  one turn before (a Task is done, its done-callback not yet run)
#   same_turn: in the same turn, just before (the future is done, nobody has resumed it)
#   later:     after the final body (the read was still waiting at close)
TIMINGS = ("earlier", "one_turn", "same_turn", "later")

A = {"type": "http.request", "body": b"a", "more_body": True}
B = {"type": "http.request", "body": b"b", "more_body": False}
DISCONNECT = {"type": "http.disconnect"}


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _race(server: FutureServer, timing: str, message: Message, finish: Any) -> None:
    """Deliver ``message`` at ``timing`` relative to ``finish()`` (the final send)."""
    if timing == "later":
        await finish()
        server.deliver(message)
        return
    server.deliver(message)
    if timing == "earlier":
        await _turns(5)
    elif timing == "one_turn":
        await _turns(1)
    await finish()


def _run(server: FutureServer, app: Any) -> RequestState:
    states: list[RequestState] = []

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        state = current()
        assert state is not None
        states.append(state)
        await app(scope, receive, send)

    mw = DisconnectMiddleware(outer, registry=CollectorRegistry())
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "headers": [],
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
    }

    async def main() -> None:
        await mw(scope, server.receive, server.send)

    asyncio.run(main())
    return states[0]


@pytest.mark.parametrize("timing", TIMINGS)
@pytest.mark.parametrize("path", SERVERS)
def test_body_chunk_read_ahead_reaches_an_app_that_answers_first(path: str, timing: str) -> None:
    server = SERVERS[path]()
    got: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _turns(2)  # the read-ahead starts and waits on the server

        async def finish() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        await _race(server, timing, A, finish)
        server.deliver(B)
        server.exhausted = True
        body = b""
        while True:
            message = await receive()
            got.append(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        assert body == b"ab"

    _run(server, app)
    assert got == [A, B]
    # The audit both ways: the app got every message the server gave, in order; the server got
    # exactly what the app sent.
    assert server.given == got
    assert server.sent == [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"ok"},
    ]


@pytest.mark.parametrize("timing", TIMINGS)
@pytest.mark.parametrize("path", SERVERS)
def test_disconnect_read_ahead_is_not_lost(path: str, timing: str) -> None:
    server = SERVERS[path]()
    got: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append(await receive())  # reads A itself
        await _turns(2)

        async def finish() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        await _race(server, timing, DISCONNECT, finish)
        server.exhausted = True
        got.append(await receive())  # must not wait forever for a disconnect already taken

    server.deliver(A)
    state = _run(server, app)
    assert got == [A, DISCONNECT]
    assert server.given == got
    # Seen before the final body it is premature; after it, normal. In between (finished in the
    # turn of the final send, its callback not run) either reading is honest.
    if timing == "earlier":
        assert state.disconnected
    elif timing == "later":
        assert not state.disconnected


@pytest.mark.parametrize("timing", ("earlier", "one_turn", "same_turn"))
@pytest.mark.parametrize("path", SERVERS)
def test_disconnect_read_when_the_app_ends_is_detected(path: str, timing: str) -> None:
    """The request ends without a final body (the app returns) in the turn the read finished:
    the disconnect taken from the server is still the one that tells what happened."""
    server = SERVERS[path]()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # A
        await _turns(2)

        async def finish() -> None:  # the app just returns
            return None

        await _race(server, timing, DISCONNECT, finish)

    server.deliver(A)
    state = _run(server, app)
    if path == "task" and timing == "same_turn":
        # The server's future is done but the Task reading it has not run yet when the app
        # returns: the Task's read has not finished, and nobody is left to read it; it is
        # cancelled, with no error and nothing left running.
        assert not state.disconnected
        return
    assert state.disconnected
    assert state.detected_by == "receive"
    assert server.given == [A, DISCONNECT]


class AnsweringServer(FutureServer):
    """Like the test transports: once the response is complete, receive() says disconnect at
    once, without waiting."""

    async def receive(self) -> Message:
        if any(m.get("type") == "http.response.body" for m in self.sent):
            return {"type": "http.disconnect"}
        return await super().receive()

    async def send(self, message: Message) -> None:
        await super().send(message)
        if message.get("type") == "http.response.body":
            for future in self.waiting:  # a read waiting on the server ends with the response
                if not future.done():
                    future.set_result({"type": "http.disconnect"})


@pytest.mark.parametrize("path", SERVERS)
def test_a_read_only_if_ready_after_the_response_is_answered_at_once(path: str) -> None:
    """Starlette's ``request.is_disconnected()`` reads in a cancelled scope: after the response
    it must see what the server says at once, not time out waiting for the read-ahead."""
    import anyio

    kind = type("AnsweringServer", (AnsweringServer, SERVERS[path]), {})
    kind.__module__ = SERVERS[path].__module__  # the driven one is named like uvicorn's
    server = kind()
    seen: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())  # A
        await _turns(2)  # the read-ahead now waits on the server
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        message: Message = {}
        with anyio.CancelScope() as scope_:
            scope_.cancel()
            message = await receive()
        seen.append(message)

    server.deliver(A)
    _run(server, app)
    assert seen == [A, DISCONNECT]
