"""The fleet channel's own metrics, once per registry (like ``telemetry.metrics.metrics_for``)."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from ..telemetry.metrics import PREFIX

DROP_REASONS = ("queue_full", "foreign", "malformed")


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        reg: Any = registry
        # livemin: in multi-process mode a single worker cut off from Redis shows as 0.
        self.up = Gauge(
            PREFIX + "fleet_channel_up",
            "1 while this process reads and writes the fleet's Redis event stream, 0 while it "
            "cannot (detection falls back to the process).",
            registry=reg,
            multiprocess_mode="livemin",
        )
        # livemax: the fullest queue among the workers; never above the queue's bound.
        self.queued = Gauge(
            PREFIX + "fleet_events_queued",
            "Events waiting in this process for Redis (bounded; down or slow Redis fills it).",
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.published = Counter(
            PREFIX + "fleet_events_published",
            "Disconnect events written to the fleet's Redis stream.",
            ["kind"],
            registry=reg,
        )
        self.received = Counter(
            PREFIX + "fleet_events_received",
            "Events from other processes of the fleet, read from its Redis stream.",
            ["kind"],
            registry=reg,
        )
        self.dropped = Counter(
            PREFIX + "fleet_events_dropped",
            "Events dropped: queue_full (Redis down or slow), foreign (another fleet), malformed.",
            ["reason"],
            registry=reg,
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason)


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, FleetMetrics] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def fleet_metrics(registry: CollectorRegistry | None) -> FleetMetrics:
    reg = REGISTRY if registry is None else registry
    with _lock:
        found = _by_registry.get(reg)
        if found is None:
            found = _by_registry[reg] = FleetMetrics(reg)
        return found
