"""ASGI protocol edge cases, driven with raw receive/send callables (no server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from otel_disconnect import DisconnectMiddleware, current
from otel_disconnect.receive_pump import BUFFER_LIMIT

Message = dict[str, Any]


class FakeServer:
    """A server-side receive/send pair fed from a script of messages."""

    def __init__(self, messages: list[Message], *, disconnect_once: bool = False) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        for m in messages:
            self.queue.put_nowait(m)
        self.sent: list[Message] = []
        self.receive_calls = 0
        self.disconnect_once = disconnect_once
        self.disconnected = False

    async def receive(self) -> Message:
        self.receive_calls += 1
        if self.disconnected and not self.disconnect_once:
            return {"type": "http.disconnect"}
        message = await self.queue.get()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        self.sent.append(message)


class DirectFakeServer(FakeServer):
    """Named like a uvicorn class, so the middleware drives its receive() without a task, as it
    does for the real servers; FakeServer itself goes through the Task fallback."""


DirectFakeServer.__module__ = "uvicorn.protocols.http.fake"


@pytest.fixture(autouse=True, params=["direct", "task"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "direct":
        monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "FakeServer", DirectFakeServer)
    return str(request.param)


def scope(method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": "/x",
        "headers": headers or [],
        "asgi": {"version": "3.0", "spec_version": "2.3"},
    }


def middleware(app: Any, **options: Any) -> DisconnectMiddleware:
    return DisconnectMiddleware(app, registry=CollectorRegistry(), **options)


def disconnects(mw: DisconnectMiddleware, method: str, phase: str, outcome: str) -> float:
    """``otel_disconnect_client_disconnects_total`` for the unrouted test scope."""
    return value(mw, "otel_disconnect_client_disconnects_total", route="unmatched",
                 method=method, phase=phase, outcome=outcome)


def value(mw: DisconnectMiddleware, name: str, **labels: str) -> float:
    registry = mw.config.registry
    assert registry is not None
    return registry.get_sample_value(name, labels) or 0.0


async def test_body_messages_reach_the_app_in_order_and_disconnect_is_replayed() -> None:
    seen: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(5):
            seen.append(await receive())

    chunks = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": True},
        {"type": "http.request", "body": b"c", "more_body": False},
        {"type": "http.disconnect"},
    ]
    server = FakeServer(chunks, disconnect_once=True)  # Hypercorn delivers it once
    mw = middleware(app)
    await mw(scope("POST"), server.receive, server.send)
    assert [m.get("body") for m in seen[:3]] == [b"a", b"b", b"c"]
    assert [m["type"] for m in seen[3:]] == ["http.disconnect", "http.disconnect"]
    assert disconnects(mw, "POST", "before_response", "cancelled") == 1


async def test_handler_that_never_receives_still_sees_the_disconnect() -> None:
    server = FakeServer([{"type": "http.request", "body": b"", "more_body": False}])
    observed: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        state = current()
        assert state is not None
        server.queue.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(state.wait_disconnected(), 5)
        observed["phase"] = state.phase
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    mw = middleware(app)
    await mw(scope(), server.receive, server.send)
    assert observed["phase"] == "before_response"
    # The app's send still reaches the server: without raise_on_send nothing changes for it.
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]
    assert value(mw, "otel_disconnect_sends_after_disconnect_total", route="unmatched") == 2
    assert value(mw, "otel_disconnect_bytes_after_disconnect_total", route="unmatched") == 4


async def test_read_ahead_is_bounded_for_a_body_the_app_does_not_read() -> None:
    chunk = b"x" * 16384
    messages = [{"type": "http.request", "body": chunk, "more_body": True} for _ in range(64)]
    server = FakeServer(messages)
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.01)  # let the read-ahead run as far as it may
        done.set()
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = middleware(app)
    await mw(scope("POST"), server.receive, server.send)
    assert done.is_set()
    # It stopped at the buffer limit: at most one chunk beyond it was read.
    assert server.receive_calls * len(chunk) <= BUFFER_LIMIT + len(chunk)


async def test_expect_100_continue_waits_for_the_app_to_read_first() -> None:
    server = FakeServer([{"type": "http.request", "body": b"x", "more_body": False}])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0)
        assert server.receive_calls == 0  # no read-ahead: it would make uvicorn send 100 Continue
        await send({"type": "http.response.start", "status": 417, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = middleware(app)
    await mw(scope("POST", [(b"expect", b"100-continue")]), server.receive, server.send)
    assert server.sent[0]["status"] == 417


async def test_send_oserror_is_detected_and_reraised() -> None:
    server = FakeServer([{"type": "http.request", "body": b"", "more_body": False}])

    async def failing_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client gone")  # ASGI 2.4

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})

    mw = middleware(app)
    with pytest.raises(OSError, match="client gone"):
        await mw(scope(), server.receive, failing_send)
    assert disconnects(mw, "GET", "streaming", "cancelled") == 1


async def test_send_oserror_behind_the_apps_own_exception_is_detected() -> None:
    """Starlette raises ClientDisconnect from the OSError a body chunk's send raised."""
    server = FakeServer([{"type": "http.request", "body": b"", "more_body": False}])

    async def failing_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client gone")

    class ClientDisconnect(Exception):
        pass

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        except OSError:
            raise ClientDisconnect() from None

    mw = middleware(app)
    with pytest.raises(ClientDisconnect):
        await mw(scope(), server.receive, failing_send)
    assert disconnects(mw, "GET", "streaming", "cancelled") == 1


async def test_an_oserror_of_the_apps_own_is_no_disconnect() -> None:
    server = FakeServer([{"type": "http.request", "body": b"", "more_body": False}])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        raise FileNotFoundError("no such file")

    mw = middleware(app)
    with pytest.raises(FileNotFoundError):
        await mw(scope(), server.receive, server.send)
    assert not any(disconnects(mw, "GET", "streaming", outcome)
                   for outcome in ("completed", "cancelled", "error"))


async def test_cancelled_app_is_detected_as_cancelled() -> None:
    server = FakeServer([{"type": "http.request", "body": b"", "more_body": False}])
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await asyncio.sleep(10)

    mw = middleware(app)
    task = asyncio.ensure_future(mw(scope(), server.receive, server.send))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert disconnects(mw, "GET", "before_response", "cancelled") == 1


async def test_app_error_after_disconnect_is_outcome_error_and_propagates() -> None:
    server = FakeServer(
        [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        state = current()
        assert state is not None
        await state.wait_disconnected()
        raise ValueError("boom")

    mw = middleware(app)
    with pytest.raises(ValueError, match="boom"):
        await mw(scope(), server.receive, server.send)
    assert disconnects(mw, "GET", "before_response", "error") == 1


async def test_receive_error_reaches_the_app_unchanged() -> None:
    class Broken(FakeServer):  # type: ignore[valid-type,misc]
        async def receive(self) -> Message:
            raise RuntimeError("server receive failed")

    server = Broken([])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with pytest.raises(RuntimeError, match="server receive failed"):
            await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = middleware(app)
    await mw(scope(), server.receive, server.send)
    assert server.sent[0]["status"] == 204


async def test_non_http_scopes_pass_through_untouched() -> None:
    calls: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append((scope["type"], receive, send))

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        return None

    mw = middleware(app)
    await mw({"type": "websocket", "path": "/ws"}, receive, send)
    await mw({"type": "lifespan"}, receive, send)
    assert calls == [("websocket", receive, send), ("lifespan", receive, send)]


async def test_internal_error_fails_open(monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_disconnect.telemetry.metrics import Metrics
    from otel_disconnect.telemetry.recorder import Recorder

    def broken(self: Any, *args: Any) -> None:
        raise RuntimeError("recorder bug")

    monkeypatch.setattr(Metrics, "count_request", broken)
    monkeypatch.setattr(Recorder, "disconnect", broken)
    server = FakeServer(
        [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = middleware(app)
    await mw(scope(), server.receive, server.send)
    assert [m.get("body") for m in server.sent] == [None, b"ok"]
    assert value(mw, "otel_disconnect_internal_errors_total", where="request_end") == 1


def test_bad_options_fail_at_construction() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    with pytest.raises(ValueError, match="count_tokens"):
        DisconnectMiddleware(app, count_tokens="sometimes")
    with pytest.raises(ValueError, match="retry_window_s"):
        DisconnectMiddleware(app, retry_window_s=-1)
    with pytest.raises(TypeError, match="unknown otel-disconnect option"):
        DisconnectMiddleware(app, cancel_on_disconect=True)
    with pytest.raises(ValueError, match="excluded_urls"):
        DisconnectMiddleware(app, excluded_urls="(")


def test_environment_variables_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    monkeypatch.setenv("OTEL_DISCONNECT_CANCEL_ON_DISCONNECT", "true")
    monkeypatch.setenv("OTEL_DISCONNECT_RETRY_WINDOW_S", "12.5")
    monkeypatch.setenv("OTEL_DISCONNECT_EXCLUDED_URLS", "^/health,^/metrics$")
    mw = DisconnectMiddleware(app, registry=CollectorRegistry())
    assert mw.config.cancel_on_disconnect is True
    assert mw.config.retry_window_s == 12.5
    assert mw.config.excluded_urls is not None and mw.config.excluded_urls.search("/health/live")
    mw = DisconnectMiddleware(app, registry=CollectorRegistry(), cancel_on_disconnect=False)
    assert mw.config.cancel_on_disconnect is False  # the argument wins
    monkeypatch.setenv("OTEL_DISCONNECT_RAISE_ON_SEND_AFTER_DISCONNECT", "maybe")
    with pytest.raises(ValueError, match="RAISE_ON_SEND_AFTER_DISCONNECT"):
        DisconnectMiddleware(app)
