"""Which sink the metrics go to: ``metrics="auto" | "prometheus" | "opentelemetry" | "both"``.

``auto`` picks OpenTelemetry when a real MeterProvider is configured (one that exports
somewhere) and no prometheus-client registry was passed, else prometheus-client as before. One
sink per request path: only ``both`` pays for two.

The chosen sink is remembered per registry key (the global REGISTRY when none was passed), so
what asks ``metrics_for(registry)`` later (internal errors, database hooks, token sources) records
into the same sink as the middleware (the most recently made middleware decides, for a registry
shared by two with different ``metrics=``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from ..compat.opentelemetry import sdk_metric_readers
from .metrics import Metrics, metrics_for, multiprocess_mode, once, select

logger = logging.getLogger("otel_disconnect")

SINKS = ("auto", "prometheus", "opentelemetry", "both")

_otel: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
# (registry, provider, sink) by their ids; holding both keeps the ids from being reused.
_both: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
_lock = threading.Lock()


def global_meter_provider() -> Any:
    from opentelemetry import metrics

    return metrics.get_meter_provider()


def exports_somewhere(provider: Any) -> bool:
    """True for a MeterProvider whose measurements go somewhere.

    Not: the API's no-op provider; the global proxy before any provider was set; an SDK
    MeterProvider without a metric reader (``opentelemetry-instrument`` with
    ``OTEL_METRICS_EXPORTER=none`` installs one of those). Another vendor's provider counts as
    real.
    """
    if provider is None:
        return False
    from opentelemetry.metrics import NoOpMeterProvider

    if isinstance(provider, NoOpMeterProvider) or type(provider).__name__ == "_ProxyMeterProvider":
        return False
    try:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    except ImportError:
        return True
    if not isinstance(provider, SdkMeterProvider):
        return True
    readers = sdk_metric_readers(provider)
    return True if readers is None else bool(readers)


def choose(metrics: str, registry: CollectorRegistry | None, meter_provider: Any) -> str:
    """The sink for these options: ``prometheus``, ``opentelemetry`` or ``both``."""
    if metrics != "auto":
        return metrics
    if registry is not None:
        return "prometheus"
    provider = meter_provider if meter_provider is not None else global_meter_provider()
    return "opentelemetry" if exports_somewhere(provider) else "prometheus"


def sink_for(metrics: str, registry: CollectorRegistry | None, meter_provider: Any) -> Any:
    """The sink (``Metrics``, ``OtelMetrics`` or ``BothMetrics``) for these options, made once
    per registry and meter provider, and remembered for ``metrics_for(registry)``."""
    kind = choose(metrics, registry, meter_provider)
    reg = REGISTRY if registry is None else registry
    if kind == "prometheus":
        sink: Any = metrics_for_prometheus(reg)
    else:
        provider = meter_provider if meter_provider is not None else global_meter_provider()
        sink = _otel_sink(provider) if kind == "opentelemetry" else _both_sink(reg, provider)
    select(reg, sink)
    return sink


def metrics_for_prometheus(registry: CollectorRegistry) -> Metrics:
    from .metrics import prometheus_metrics

    return prometheus_metrics(registry)


def _otel_sink(provider: Any) -> Any:
    from .otel_metrics import OtelMetrics

    return once(_otel, provider, _lock, lambda: OtelMetrics(provider))


def _both_sink(registry: CollectorRegistry, provider: Any) -> Any:
    from .otel_metrics import BothMetrics, OtelMetrics

    prometheus = metrics_for_prometheus(registry)
    key = (id(registry), id(provider))
    with _lock:
        entry = _both.get(key)
        if entry is None:
            # In one process the OpenTelemetry instrument reads the same live sets.
            shared = None if multiprocess_mode() else prometheus.in_flight
            sink = BothMetrics(prometheus, OtelMetrics(provider, shared))
            entry = _both[key] = (registry, provider, sink)
        return entry[2]


__all__ = ["SINKS", "choose", "exports_somewhere", "metrics_for", "sink_for"]
