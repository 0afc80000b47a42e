"""The fleet channel's own metrics (``catalog.FLEET_METRICS``) on the sink chosen for the
channel's registry (``telemetry.metrics.metrics_for``): prometheus-client, OpenTelemetry or both,
as the middleware's. Made once per registry, meter provider, or pair of them.

Every sink has the prometheus-client shape (``.set(v)``, ``.labels(v).inc(n)``), so the channel
records the same way on each. On OpenTelemetry nothing the channel calls reaches the SDK:
counters are counted here and gauges are plain values, both observed when the SDK collects. A
broken MeterProvider can only fail while the instruments are made; the channel's metrics then
stay on prometheus-client and an internal error (``meter_provider``) is counted.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from ..failsafe import internal_error
from ..telemetry.catalog import FLEET_METRICS
from ..telemetry.metrics import metrics_for, once

DROP_REASONS = ("queue_full", "foreign", "malformed")

# Multi-process mode: livemin, a single worker cut off from Redis shows as 0; livemax, the
# fullest queue among the workers (never above the queue's bound).
_MULTIPROCESS_MODE: dict[str, Any] = {"up": "livemin", "queued": "livemax"}


class FleetFamilies:
    kind: str
    up: Any
    queued: Any
    published: Any
    received: Any
    dropped: Any

    def _reasons(self) -> None:
        # Every reason at 0 from the start: increase() misses the first drop of a new series.
        for reason in DROP_REASONS:
            self.dropped.labels(reason)


class FleetMetrics(FleetFamilies):
    """prometheus-client families, registered in ``registry``."""

    kind = "prometheus"

    def __init__(self, registry: CollectorRegistry) -> None:
        reg: Any = registry
        for spec in FLEET_METRICS:
            if spec.kind == "gauge":
                mode = _MULTIPROCESS_MODE[spec.attr]
                family: Any = Gauge(spec.name, spec.help, registry=reg, multiprocess_mode=mode)
            else:
                family = Counter(spec.name, spec.help, list(spec.labels), registry=reg)
            setattr(self, spec.attr, family)
        self._reasons()


class OtelFleetMetrics(FleetFamilies):
    """Observable instruments of the ``otel_disconnect`` meter of ``meter_provider``."""

    kind = "opentelemetry"

    def __init__(self, meter_provider: Any) -> None:
        from ..telemetry.otel_metrics import METER_NAME, observed_counter, observed_gauge
        from ..version import __version__

        meter = meter_provider.get_meter(METER_NAME, __version__)
        # The up gauge last: a provider that fails half-way must not leave a gauge stuck at 0
        # on its side (FleetChannelDown) while the channel's values go to prometheus-client.
        for spec in sorted(FLEET_METRICS, key=lambda s: s.attr == "up"):
            make: Callable[[Any, Any], Any] = (
                observed_gauge if spec.kind == "gauge" else observed_counter
            )
            setattr(self, spec.attr, make(meter, spec))
        self._reasons()


class _BothGauge:
    __slots__ = ("set",)

    def __init__(self, first: Callable[[float], None], second: Callable[[float], None]) -> None:
        def set_(value: float) -> None:
            first(value)
            second(value)

        self.set = set_


class BothFleetMetrics(FleetFamilies):
    """``metrics="both"``: every update to both."""

    kind = "both"

    def __init__(self, prometheus: FleetMetrics, opentelemetry: OtelFleetMetrics) -> None:
        from ..telemetry.otel_metrics import BothFamily

        for spec in FLEET_METRICS:
            first, second = getattr(prometheus, spec.attr), getattr(opentelemetry, spec.attr)
            family: Any = (
                _BothGauge(first.set, second.set)
                if spec.kind == "gauge"
                else BothFamily(first, second, "inc")
            )
            setattr(self, spec.attr, family)


_prometheus: weakref.WeakKeyDictionary[CollectorRegistry, FleetMetrics] = (
    weakref.WeakKeyDictionary()
)
_otel: weakref.WeakKeyDictionary[Any, OtelFleetMetrics] = weakref.WeakKeyDictionary()
_both: weakref.WeakKeyDictionary[Any, BothFleetMetrics] = weakref.WeakKeyDictionary()  # by sink
_lock = threading.Lock()


def fleet_metrics(registry: CollectorRegistry | None) -> FleetFamilies:
    """The fleet metrics on the sink chosen for ``registry`` (None: the global REGISTRY)."""
    reg = REGISTRY if registry is None else registry
    sink = metrics_for(reg)
    kind = getattr(sink, "kind", "prometheus")
    if kind not in ("opentelemetry", "both"):
        return prometheus_fleet_metrics(reg)
    try:
        provider = (sink.opentelemetry if kind == "both" else sink).meter_provider
        otel: OtelFleetMetrics = once(_otel, provider, _lock, lambda: OtelFleetMetrics(provider))
    except Exception:
        internal_error("meter_provider", registry)
        return prometheus_fleet_metrics(reg)
    if kind == "opentelemetry":
        return otel
    prometheus = prometheus_fleet_metrics(reg)
    both: BothFleetMetrics = once(_both, sink, _lock, lambda: BothFleetMetrics(prometheus, otel))
    return both


def prometheus_fleet_metrics(registry: CollectorRegistry) -> FleetMetrics:
    made: FleetMetrics = once(_prometheus, registry, _lock, lambda: FleetMetrics(registry))
    return made
