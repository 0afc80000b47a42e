"""The fleet channel on a real redis-server: what one process publishes another hears; its own
echoes, another fleet's and malformed events are dropped (the last two counted); Redis down,
paused or the URL wrong never blocks ``publish()``, shows in the gauge and the internal-error
counter, keeps memory bounded, and the channel comes back by itself."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry

from otel_disconnect.fleet import events
from otel_disconnect.fleet.channel import FleetChannel, stream_key

from .redis_server import RedisServer


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not met within {timeout}s"
        await asyncio.sleep(0.01)


def channel(url: str, fleet: str = "f1", **kw: Any) -> tuple[FleetChannel, list[Any], Any]:
    heard: list[Any] = []
    registry = CollectorRegistry()
    return FleetChannel(url, fleet, heard.append, registry=registry, **kw), heard, registry


async def test_events_reach_the_other_process_not_back_to_their_sender(
    redis_server: RedisServer,
) -> None:
    a, heard_a, reg_a = channel(redis_server.url)
    b, heard_b, reg_b = channel(redis_server.url)
    a.ensure_started()
    b.ensure_started()
    try:
        await until(lambda: value(reg_a, "otel_disconnect_fleet_channel_up") == 1)
        await until(lambda: value(reg_b, "otel_disconnect_fleet_channel_up") == 1)
        a.publish(events.retry(a.fleet, a.origin, b"\x01" * 8, time.time(), 30.0))
        await until(lambda: heard_b)
        assert heard_b[0].kind == "r" and heard_b[0].fp == b"\x01" * 8
        # Counted when Redis answered the writer, which may be after b already read it.
        await until(
            lambda: value(reg_a, "otel_disconnect_fleet_events_published_total", kind="retry") == 1
        )
        assert value(reg_b, "otel_disconnect_fleet_events_received_total", kind="retry") == 1
        # b publishes after a's event: once a has heard b's, it would have heard its own.
        b.publish(events.over(b.fleet, b.origin, time.time(), "app", 42))
        await until(lambda: heard_a)
        assert [e.kind for e in heard_a] == ["x"]
    finally:
        await a.aclose()
        await b.aclose()


async def test_other_fleets_and_malformed_entries_are_dropped_and_counted(
    redis_server: RedisServer,
) -> None:
    b, heard, registry = channel(redis_server.url, "f1")
    b.ensure_started()
    try:
        await until(lambda: value(registry, "otel_disconnect_fleet_channel_up") == 1)
        raw = redis_server.client()
        key = stream_key("f1")
        raw.xadd(key, {"e": events.retry("f2", "elsewhere", b"\x02" * 8, time.time(), 30)})
        raw.xadd(key, {"e": b"not json"})
        raw.xadd(key, {"e": b'{"v":1,"k":"r","f":"f1","o":"x","t":1,"fp":"zz","w":1}'})
        raw.xadd(key, {"other": b"field"})
        raw.xadd(key, {"e": events.over("f1", "elsewhere", time.time(), "app", 7)})
        await until(lambda: heard)
        assert [e.kind for e in heard] == ["x"]  # only the good one, after the bad ones
        assert value(registry, "otel_disconnect_fleet_events_dropped_total", reason="foreign") == 1
        assert (
            value(registry, "otel_disconnect_fleet_events_dropped_total", reason="malformed") == 3
        )
    finally:
        await b.aclose()


async def test_wrong_url_never_blocks_and_is_visible() -> None:
    a, _, registry = channel("redis://127.0.0.1:1/0", queue_max=100)
    a.ensure_started()
    try:
        started = time.perf_counter()
        for i in range(1000):
            a.publish(events.over(a.fleet, a.origin, time.time(), "app", i + 1))
        # No I/O in publish(): a thousand calls finish without yielding to the loop once.
        assert not a.queue or len(a.queue) <= 100
        elapsed = time.perf_counter() - started
        await until(
            lambda: value(registry, "otel_disconnect_internal_errors_total", where="fleet_read") > 0
        )
        await until(
            lambda: value(registry, "otel_disconnect_internal_errors_total", where="fleet_publish")
            > 0
        )
        assert value(registry, "otel_disconnect_fleet_channel_up") == 0
        # Bounded while down: at most queue_max kept, the rest dropped and counted.
        assert len(a.queue) <= 100
        dropped = value(registry, "otel_disconnect_fleet_events_dropped_total", reason="queue_full")
        assert dropped >= 900, dropped
        assert elapsed < 1.0  # a generous sanity bound: it ran without any network wait
    finally:
        await a.aclose()


async def test_restart_and_pause_recover_and_queued_events_arrive(
    redis_server: RedisServer,
) -> None:
    a, _, reg_a = channel(redis_server.url)
    b, heard_b, reg_b = channel(redis_server.url)
    a.ensure_started()
    b.ensure_started()
    try:
        await until(lambda: value(reg_b, "otel_disconnect_fleet_channel_up") == 1)
        redis_server.kill()
        a.publish(events.over(a.fleet, a.origin, time.time(), "app", 1))  # queued while down
        await until(lambda: value(reg_b, "otel_disconnect_fleet_channel_up") == 0)
        await until(lambda: value(reg_a, "otel_disconnect_fleet_channel_up") == 0)
        assert len(a.queue) == 1  # kept for when Redis is back
        redis_server.start()
        await until(lambda: value(reg_a, "otel_disconnect_fleet_channel_up") == 1, timeout=30)
        await until(lambda: value(reg_b, "otel_disconnect_fleet_channel_up") == 1, timeout=30)
        # The queued event went out once Redis was back, and b, which resumes after the last
        # event it read, hears it whichever of a's writer and b's reader reconnected first.
        await until(lambda: any(e.pid == 1 for e in heard_b), timeout=30)
        assert not a.queue
        a.publish(events.over(a.fleet, a.origin, time.time(), "app", 2))
        await until(lambda: any(e.pid == 2 for e in heard_b), timeout=30)
        assert [e.pid for e in heard_b] == [1, 2]
        # Paused writes (a slow Redis): publish() still returns at once, and the event arrives.
        redis_server.client().execute_command("CLIENT", "PAUSE", "500", "WRITE")
        a.publish(events.over(a.fleet, a.origin, time.time(), "app", 3))
        await until(lambda: any(e.pid == 3 for e in heard_b), timeout=30)
    finally:
        await a.aclose()
        await b.aclose()
