"""The OpenTelemetry sink: every metric of ``catalog.METRICS`` as an instrument of one meter.

The families have the prometheus-client sink's shape (``labels(*values).inc(n)`` /
``.observe(v)``), so every call site records the same way whichever sink it was given. A label
child holds its attributes dict, built once: the SDK is handed the same dict on every call.

What prometheus-client reads at scrape time is observed at collection time here: the in-flight
series are an observable up-down counter over the sets of live requests (``metrics.InFlight``),
so no request pays for them. Histograms marked ``exemplars`` are recorded in the current
context, where the request's server span is: the SDK's default ``trace_based`` exemplar filter
then attaches its trace id.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..version import __version__
from .catalog import METRICS, MetricSpec
from .metrics import MAX_MODELS, OTHER_MODEL, InFlight

METER_NAME = "otel_disconnect"


class _Child:
    __slots__ = ("inc", "observe")

    def __init__(self, call: Any, attributes: dict[str, str]) -> None:
        # Counter.add(amount, attributes) / Histogram.record(amount, attributes)
        def bound(amount: float = 1) -> None:
            call(amount, attributes)

        self.inc = self.observe = bound


class _Family:
    """One instrument and its label children, cached by label values."""

    __slots__ = ("_call", "_children", "_labels")

    def __init__(self, call: Any, labels: tuple[str, ...]) -> None:
        self._call = call
        self._labels = labels
        self._children: dict[tuple[str, ...], _Child] = {}

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labels):
                raise ValueError(f"expected labels {self._labels}, got {values!r}")
            attributes = dict(zip(self._labels, (str(v) for v in values), strict=True))
            child = self._children.setdefault(values, _Child(self._call, attributes))
        return child


def _instrument(meter: Any, spec: MetricSpec) -> Any:
    if spec.kind == "counter":
        return meter.create_counter(spec.name, unit=spec.unit, description=spec.help)
    assert spec.buckets is not None, spec.name
    return meter.create_histogram(
        spec.name,
        unit=spec.unit,
        description=spec.help,
        explicit_bucket_boundaries_advisory=[float(b) for b in spec.buckets],
    )


class OtelMetrics:
    """The metric families as OpenTelemetry instruments of ``meter_provider``."""

    kind = "opentelemetry"

    if TYPE_CHECKING:  # the families are set from the catalog: adding one is a one-entry change

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, meter_provider: Any, in_flight: InFlight | None = None) -> None:
        meter = meter_provider.get_meter(METER_NAME, __version__)
        self.unregistered: list[str] = []
        for spec in METRICS:
            if spec.kind == "inflight":
                continue
            instrument = _instrument(meter, spec)
            call = instrument.add if spec.kind == "counter" else instrument.record
            setattr(self, spec.attr, _Family(call, spec.labels))
        self.in_flight = in_flight if in_flight is not None else InFlight(None, None, False)
        live, zombies = self.in_flight.live, self.in_flight.zombies
        if live is None or zombies is None:
            raise ValueError("the OpenTelemetry sink reads in-flight requests from sets")
        spec = next(s for s in METRICS if s.kind == "inflight")
        self._observed = _observe_in_flight(live, zombies)
        meter.create_observable_up_down_counter(
            spec.name, callbacks=[self._observed], unit=spec.unit, description=spec.help
        )
        self._requests_children: dict[tuple[str, str], Any] = {}
        self._models: set[str] = set()
        self._lock = threading.Lock()

    def count_request(self, route: str, method: str) -> None:
        key = (route, method)
        add = self._requests_children.get(key)
        if add is None:
            add = self._requests_children[key] = self.requests.labels(route, method).inc
        add()

    def model_label(self, model: str | None) -> str:
        """Cap model label values at MAX_MODELS per process; later ones become ``other``."""
        if not model:
            return "unknown"
        if model in self._models:
            return model
        with self._lock:
            if len(self._models) < MAX_MODELS:
                self._models.add(model)
                return model
        return OTHER_MODEL


def _observe_in_flight(live: set[object], zombies: set[object]) -> Any:
    from opentelemetry.metrics import Observation

    connected, disconnected = {"client": "connected"}, {"client": "disconnected"}

    def observe(options: Any) -> Iterable[Observation]:
        return (Observation(len(live), connected), Observation(len(zombies), disconnected))

    return observe


class _BothChild:
    __slots__ = ("inc", "observe")

    def __init__(self, a: Any, b: Any) -> None:

        def both(amount: float = 1) -> None:
            a(amount)
            b(amount)

        self.inc = self.observe = both


class _BothFamily:
    __slots__ = ("_children", "_first", "_method", "_second")

    def __init__(self, first: Any, second: Any, method: str) -> None:
        self._first, self._second, self._method = first, second, method
        self._children: dict[tuple[str, ...], _BothChild] = {}

    def labels(self, *values: str) -> _BothChild:
        child = self._children.get(values)
        if child is None:
            first = getattr(self._first.labels(*values), self._method)
            second = getattr(self._second.labels(*values), self._method)
            child = self._children.setdefault(values, _BothChild(first, second))
        return child


class _BothInFlight:
    """Two InFlight bookkeepers moved together (multi-process mode, where the prometheus-client
    one moves shared-memory gauges and the OpenTelemetry one keeps sets)."""

    __slots__ = ("arrived", "disconnected", "left", "live", "zombie_ended", "zombies")

    def __init__(self, first: InFlight, second: InFlight) -> None:
        self.live, self.zombies = second.live, second.zombies
        for name in ("arrived", "disconnected", "left", "zombie_ended"):
            setattr(self, name, _both(getattr(first, name), getattr(second, name)))


def _both(a: Any, b: Any) -> Any:
    def call(state: object) -> None:
        a(state)
        b(state)

    return call


class BothMetrics:
    """``metrics="both"``: every update goes to the prometheus-client and OpenTelemetry sinks.

    The in-flight sets are shared, so requests pay for them once.
    """

    kind = "both"

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, prometheus: Any, opentelemetry: OtelMetrics) -> None:
        self.prometheus, self.opentelemetry = prometheus, opentelemetry
        self.unregistered = prometheus.unregistered
        for spec in METRICS:
            if spec.kind != "inflight":
                method = "inc" if spec.kind == "counter" else "observe"
                first, second = getattr(prometheus, spec.attr), getattr(opentelemetry, spec.attr)
                setattr(self, spec.attr, _BothFamily(first, second, method))
        if prometheus.in_flight is opentelemetry.in_flight:
            self.in_flight: Any = prometheus.in_flight
        else:
            self.in_flight = _BothInFlight(prometheus.in_flight, opentelemetry.in_flight)
        self.model_label = prometheus.model_label
        self._count = (prometheus.count_request, opentelemetry.count_request)

    def count_request(self, route: str, method: str) -> None:
        first, second = self._count
        first(route, method)
        second(route, method)
