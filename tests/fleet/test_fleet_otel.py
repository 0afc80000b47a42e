"""The fleet channel's metrics follow the sink the middleware chose for its registry. On
OpenTelemetry (an SDK MeterProvider with an in-memory reader), a channel on a real redis-server
reports up 1, then 0 when the server is stopped and 1 again when it is back, and counts what it
published, received and queued meanwhile; none of it in the prometheus-client registry. A meter
provider whose instruments raise, or that fails to make them, leaves the channel working."""

from __future__ import annotations

import time
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from otel_disconnect import DisconnectMiddleware
from otel_disconnect.fleet import events
from otel_disconnect.fleet.channel import FleetChannel
from otel_disconnect.fleet.metrics import (
    DROP_REASONS,
    BothFleetMetrics,
    FleetMetrics,
    OtelFleetMetrics,
    fleet_metrics,
)
from otel_disconnect.telemetry import sinks

from .redis_server import RedisServer
from .test_channel import until

UP = "otel_disconnect_fleet_channel_up"
QUEUED = "otel_disconnect_fleet_events_queued"
PUBLISHED = "otel_disconnect_fleet_events_published"
RECEIVED = "otel_disconnect_fleet_events_received"
DROPPED = "otel_disconnect_fleet_events_dropped"


def points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[tuple[str, Any], ...], float]]:
    """instrument name -> {sorted attributes: value}, the otel_disconnect meter's only."""
    data = reader.get_metrics_data()
    return {
        m.name: {tuple(sorted(p.attributes.items())): p.value for p in m.data.data_points}
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        if sm.scope.name == "otel_disconnect"
        for m in sm.metrics
    }


def point(reader: InMemoryMetricReader, name: str, **attributes: str) -> float | None:
    return points(reader).get(name, {}).get(tuple(sorted(attributes.items())))


def otel_channel(url: str) -> tuple[FleetChannel, list[Any], InMemoryMetricReader, Any]:
    """A channel whose registry's sink is OpenTelemetry, as a middleware would choose it."""
    heard: list[Any] = []
    registry = CollectorRegistry()
    reader = InMemoryMetricReader()
    sinks.sink_for("opentelemetry", registry, MeterProvider(metric_readers=[reader]))
    return FleetChannel(url, "f1", heard.append, registry=registry), heard, reader, registry


@pytest.mark.parametrize(
    ("metrics", "expected", "in_registry"),
    [
        ("prometheus", FleetMetrics, True),
        ("opentelemetry", OtelFleetMetrics, False),
        ("both", BothFleetMetrics, True),
    ],
)
def test_the_channel_follows_the_middlewares_sink(
    metrics: str, expected: type, in_registry: bool
) -> None:
    registry = CollectorRegistry()
    reader = InMemoryMetricReader()
    mw = DisconnectMiddleware(
        lambda *a: None,
        registry=registry,
        metrics=metrics,
        meter_provider=MeterProvider(metric_readers=[reader]),
        redis_url="unix:///nowhere/redis.sock",  # never connected: no request runs
    )
    channel = mw.fleet.channel
    assert isinstance(channel.metrics, expected)
    assert fleet_metrics(registry) is channel.metrics  # made once per registry and provider
    assert (registry.get_sample_value(UP) == 0) is in_registry
    assert (registry.get_sample_value(DROPPED + "_total", {"reason": "queue_full"}) == 0) is (
        in_registry
    )
    if metrics != "prometheus":
        assert point(reader, UP) == 0
        assert {point(reader, DROPPED, reason=r) for r in DROP_REASONS} == {0}
    else:
        assert UP not in points(reader)


async def test_up_published_received_and_queued_through_opentelemetry(
    redis_server: RedisServer,
) -> None:
    a, _heard_a, reader_a, registry_a = otel_channel(redis_server.url)
    b, heard_b, reader_b, _registry_b = otel_channel(redis_server.url)
    a.ensure_started()
    b.ensure_started()
    try:
        await until(lambda: point(reader_a, UP) == 1 and point(reader_b, UP) == 1)
        a.publish(events.retry(a.fleet, a.origin, b"\x01" * 8, time.time(), 30.0))
        await until(lambda: point(reader_a, PUBLISHED, kind="retry") == 1)
        await until(lambda: point(reader_b, RECEIVED, kind="retry") == 1)
        assert heard_b[0].fp == b"\x01" * 8
        assert point(reader_a, QUEUED) == 0
        assert point(reader_b, PUBLISHED, kind="retry") is None  # b published nothing
        # Not in the prometheus-client registry: OpenTelemetry was chosen for it.
        assert registry_a.get_sample_value(UP) is None

        redis_server.stop()
        await until(lambda: point(reader_a, UP) == 0 and point(reader_b, UP) == 0)
        a.publish(events.over(a.fleet, a.origin, time.time(), "app", 42))
        await until(lambda: point(reader_a, QUEUED) == 1)  # waits for Redis

        redis_server.start()
        await until(lambda: point(reader_a, UP) == 1 and point(reader_b, UP) == 1, 30)
        await until(lambda: point(reader_b, RECEIVED, kind="over") == 1)
        assert point(reader_a, PUBLISHED, kind="over") == 1
        assert point(reader_a, QUEUED) == 0
        assert point(reader_a, DROPPED, reason="queue_full") == 0
    finally:
        await a.aclose()
        await b.aclose()


# -- a meter provider that misbehaves ---------------------------------------------------------


class Raising:
    """An instrument every method of which raises."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"instrument.{name} is broken")

        return fail


class Meter:
    def __init__(self, fail_gauges: bool) -> None:
        self.fail_gauges = fail_gauges
        self.callbacks: dict[str, list[Any]] = {}

    def __getattr__(self, method: str) -> Any:
        if not method.startswith("create_"):
            raise AttributeError(method)

        def create(name: str, callbacks: Any = (), **kwargs: Any) -> Raising:
            if self.fail_gauges and method == "create_observable_gauge":
                raise RuntimeError("no gauges today")
            self.callbacks[name] = list(callbacks)
            return Raising()

        return create

    def observe(self, name: str) -> dict[tuple[tuple[str, Any], ...], float]:
        """What a collection would read: the callbacks the SDK would call."""
        return {
            tuple(sorted((o.attributes or {}).items())): o.value
            for callback in self.callbacks[name]
            for o in callback(None)
        }


class Provider:
    def __init__(self, fail_gauges: bool) -> None:
        self.meter = Meter(fail_gauges)

    def get_meter(self, *args: Any, **kwargs: Any) -> Meter:
        return self.meter


@pytest.mark.parametrize("fail_gauges", [False, True], ids=["instruments-raise", "make-fails"])
async def test_a_broken_meter_provider_does_not_break_the_channel(
    redis_server: RedisServer, fail_gauges: bool
) -> None:
    provider = Provider(fail_gauges)
    registry = CollectorRegistry()
    sink = sinks.sink_for("opentelemetry", registry, provider)
    heard: list[Any] = []
    a = FleetChannel(redis_server.url, "f1", heard.append, registry=registry)
    b, heard_b, reader_b, _ = otel_channel(redis_server.url)
    a.ensure_started()
    b.ensure_started()
    try:
        await until(lambda: point(reader_b, UP) == 1)
        if fail_gauges:
            # Its instruments could not be made: the channel's metrics stay on prometheus-client,
            # and no up gauge was left behind on the provider's side.
            assert isinstance(a.metrics, FleetMetrics)
            assert UP not in provider.meter.callbacks
            assert sink.internal_errors.labels("meter_provider").value == 1
            await until(lambda: registry.get_sample_value(UP) == 1)
        else:
            assert isinstance(a.metrics, OtelFleetMetrics)
            await until(lambda: provider.meter.observe(UP) == {(): 1})
        a.publish(events.retry(a.fleet, a.origin, b"\x03" * 8, time.time(), 30.0))
        b.publish(events.over(b.fleet, b.origin, time.time(), "app", 7))
        await until(lambda: heard_b and heard)
        await until(lambda: point(reader_b, RECEIVED, kind="retry") == 1)
        if not fail_gauges:
            await until(lambda: provider.meter.observe(PUBLISHED) == {(("kind", "retry"),): 1})
            assert provider.meter.observe(RECEIVED) == {(("kind", "over"),): 1}
        assert all(not t.done() for t in a.tasks)  # neither task died
    finally:
        await a.aclose()
        await b.aclose()
