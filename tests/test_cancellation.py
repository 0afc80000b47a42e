"""cancel_on_disconnect, protect(), raise_on_send_after_disconnect and retries, on real servers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from otel_disconnect.cancel import protect
from otel_disconnect.retry import RetryTracker

from .apps import Signals, build_app
from .conftest import Telemetry
from .servers import RawClient, advertises_asgi_24_without_raising, serve, wait_for


def _span(telemetry: Telemetry, route: str, count: int = 1) -> Any:
    def find() -> Any:
        spans = [s for s in telemetry.server_spans() if s.attributes.get("http.route") == route]
        return spans if len(spans) >= count else None

    return wait_for(find)[-1]


def test_cancel_on_disconnect_stops_a_non_streaming_handler(telemetry: Telemetry) -> None:
    signals = Signals()
    app = build_app(signals, cancel_on_disconnect=True, **telemetry.options())
    with serve(app, "uvicorn-httptools") as server, RawClient(server.port) as client:
        client.request("GET", "/work?seconds=5")
        signals.wait("work.started")
        client.close()
        attrs = _span(telemetry, "/work").attributes
    assert attrs["disconnect.outcome"] == "cancelled"
    assert attrs["disconnect.phase"] == "before_response"
    assert attrs["disconnect.work_after_s"] < 0.05
    assert not signals.event("work.finished").is_set()
    assert telemetry.value("otel_disconnect_inflight_requests", client="disconnected") == 0


def test_cancel_policy_is_asked_per_request_after_routing(telemetry: Telemetry) -> None:
    asked: list[str] = []

    def policy(scope: Any) -> bool:
        asked.append(scope["route"].path)
        return bool(scope["route"].path == "/work")

    signals = Signals()
    app = build_app(signals, cancel_on_disconnect=policy, **telemetry.options())
    with serve(app, "uvicorn-h11") as server:
        with RawClient(server.port) as client:
            client.request("GET", "/sleep?seconds=0.3")
            signals.wait("sleep.started")
        with RawClient(server.port) as client:
            client.request("GET", "/work?seconds=5")
            signals.wait("work.started")
        work = _span(telemetry, "/work").attributes
        sleep = _span(telemetry, "/sleep").attributes
    assert sorted(asked) == ["/sleep", "/work"]
    assert work["disconnect.outcome"] == "cancelled"
    assert sleep["disconnect.outcome"] == "completed"  # not cancelled: the policy said no


def test_protect_defers_cancellation_to_the_end_of_the_block(telemetry: Telemetry) -> None:
    signals = Signals()
    app = build_app(signals, cancel_on_disconnect=True, **telemetry.options())
    with serve(app, "uvicorn-httptools") as server, RawClient(server.port) as client:
        client.request("GET", "/protected?seconds=0.3")
        signals.wait("protected.entered")
        client.close()
        attrs = _span(telemetry, "/protected").attributes
    assert signals.event("protected.committed").is_set()  # the block ran to its end
    assert not signals.event("protected.after_block").is_set()  # cancelled at its exit
    assert attrs["disconnect.protected_section"] == "commit"
    assert attrs["disconnect.outcome"] == "cancelled"


async def test_protect_decorator_survives_a_plain_task_cancel() -> None:
    done: list[str] = []

    @protect("flush")
    async def flush() -> str:
        await asyncio.sleep(0.05)
        done.append("flushed")
        return "ok"

    task = asyncio.ensure_future(flush())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["flushed"]
    assert await flush() == "ok"


async def test_protect_context_manager_shields_from_anyio_cancellation() -> None:
    import anyio

    done: list[str] = []

    async def body() -> None:
        async with protect("cleanup"):
            await asyncio.sleep(0.05)
            done.append("cleaned")
        done.append("after")  # never: the cancellation is delivered at the exit

    async with anyio.create_task_group() as tg:
        tg.start_soon(body)
        await asyncio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert done == ["cleaned"]


@pytest.mark.matrix
@pytest.mark.parametrize("raise_on_send", [False, True])
def test_raise_on_send_stops_the_stream_at_the_next_token(
    raise_on_send: bool, telemetry: Telemetry
) -> None:
    signals = Signals()
    app = build_app(signals, raise_on_send_after_disconnect=raise_on_send, **telemetry.options())
    with serve(app, "uvicorn-httptools") as server, RawClient(server.port) as client:
        client.request("GET", "/tokens?n=60&interval=0.02")
        client.read_until(b"tok4 ")
        client.close()
        attrs = _span(telemetry, "/tokens").attributes
    counts = signals.values["tokens.counts"]
    if raise_on_send:
        assert counts["after"] <= 2, counts
        assert attrs["disconnect.outcome"] == "cancelled"
    elif advertises_asgi_24_without_raising("uvicorn-httptools"):
        assert counts["generated"] == 60  # the bug this option fixes: it ran to the end
        assert attrs["disconnect.outcome"] == "completed"
    else:
        assert counts["generated"] < 60  # Starlette's own listener stopped it


def test_retries_are_flagged_and_distinct_requests_are_not(telemetry: Telemetry) -> None:
    signals = Signals()
    app = build_app(signals, **telemetry.options())

    def post(body: bytes, *, leave: bool, key: str | None = None) -> None:
        headers = {"Idempotency-Key": key} if key else {}
        with RawClient(server.port) as client:
            client.request("POST", "/generate?seconds=0.3", body=body, headers=headers)
            if leave:
                signals.event("generate.started").clear()
                signals.wait("generate.started")
                return  # the client times out and goes
            client.read_until(b'{"size":')

    def retries() -> float:
        return telemetry.value("otel_disconnect_retries_after_disconnect_total", route="/generate")

    with serve(app, "uvicorn-h11") as server:
        post(b'{"prompt": "a"}', leave=True)
        wait_for(lambda: telemetry.value(
            "otel_disconnect_requests_total", route="/generate", method="POST") == 1)
        post(b'{"prompt": "b"}', leave=False)  # different body: not a retry
        post(b'{"prompt": "a"}', leave=False)  # the same request again: a retry
        post(b'{"prompt": "c"}', leave=True, key="k-1")
        wait_for(lambda: telemetry.value(
            "otel_disconnect_requests_total", route="/generate", method="POST") == 4)
        post(b'{"prompt": "c, edited"}', leave=False, key="k-1")  # same key: a retry
        post(b'{"prompt": "c"}', leave=False, key="k-2")  # another key: not a retry
        wait_for(lambda: telemetry.value(
            "otel_disconnect_requests_total", route="/generate", method="POST") == 6)
    flags = [
        bool(s.attributes.get("disconnect.retry_of_disconnected"))
        for s in sorted(telemetry.server_spans(), key=lambda s: s.start_time or 0)
        if s.attributes.get("http.route") == "/generate"
    ]
    assert flags == [False, False, True, False, True, False]
    assert retries() == 2


def test_retry_tracker_is_bounded_and_expires() -> None:
    tracker = RetryTracker(window_s=10, max_entries=100)
    for i in range(1000):
        tracker.remember(i.to_bytes(8, "big"), at=float(i) / 1000)
    assert len(tracker) == 100
    assert tracker.is_retry((999).to_bytes(8, "big"), started=1.0, now=1.0)
    assert not tracker.is_retry((0).to_bytes(8, "big"), started=1.0, now=1.0)  # evicted
    # Kept past the window (a long retry is checked at its end), matched only within it.
    assert not tracker.is_retry((999).to_bytes(8, "big"), started=11.5, now=15.0)
    assert tracker.is_retry((999).to_bytes(8, "big"), started=10.5, now=20.5)
    assert not tracker.is_retry((999).to_bytes(8, "big"), started=10.5, now=21.5)  # expired
    assert len(tracker) == 0


def test_only_a_request_that_began_after_the_disconnect_is_its_retry() -> None:
    tracker = RetryTracker(window_s=10)
    fp = b"12345678"
    tracker.remember(fp, at=5.0)
    assert not tracker.is_retry(fp, started=4.9, now=6.0)  # already running: a neighbour
    assert not tracker.is_retry(fp, started=5.0, now=6.0)  # the disconnected request itself
    assert tracker.is_retry(fp, started=5.1, now=6.0)
    # A retry that disconnects too keeps the first disconnect for a request started between.
    tracker.remember(fp, at=7.0)
    assert tracker.is_retry(fp, started=6.0, now=8.0)
    assert tracker.is_retry(fp, started=7.5, now=8.0)


