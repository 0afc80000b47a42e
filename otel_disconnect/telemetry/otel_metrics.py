"""The OpenTelemetry sink: every metric of ``catalog.METRICS`` as an instrument of one meter.

The families have the prometheus-client sink's shape (``labels(*values).inc(n)`` /
``.observe(v)``), so every call site records the same way whichever sink it was given.

- Counters are counted here, under a lock as prometheus-client does, and reported by observable
  counters when the SDK collects (cumulative; the SDK turns them into deltas for an exporter
  that wants those).
- Gauges without labels (the fleet channel's) are a plain value set here, reported by
  observable gauges.
- The in-flight series are an observable up-down counter over the sets of live requests
  (``metrics.InFlight``), read at collection time as prometheus-client reads them at scrape time.
- Histograms are the SDK's, recorded in the current context, where the request's server span is:
  with the SDK's default ``trace_based`` exemplar filter each observation of a sampled request
  carries its trace id as an exemplar (work after disconnect, generation after disconnect).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..version import __version__
from .catalog import METRICS, MetricSpec
from .metrics import InFlight, ModelLabels

METER_NAME = "otel_disconnect"


class _Counted:
    """A counter series counted here and observed at collection time: the SDK's synchronous
    ``Counter.add`` costs about twenty times prometheus-client's ``inc`` (measurement object,
    exemplar filter, attribute set lookup, two locks), too much for a path every request takes.
    """

    __slots__ = ("attributes", "inc", "value")

    def __init__(self, attributes: dict[str, str], lock: threading.Lock) -> None:
        self.attributes = attributes
        self.value: float = 0

        def inc(amount: float = 1) -> None:
            with lock:
                self.value += amount

        self.inc = inc


class _Recorded:
    """A histogram series: the SDK's ``Histogram.record`` in the current context, so a sampled
    request span becomes the exemplar. Only disconnected requests record histograms."""

    __slots__ = ("observe",)

    def __init__(self, record: Any, attributes: dict[str, str]) -> None:
        def observe(amount: float) -> None:
            record(amount, attributes)

        self.observe = observe


class _Family:
    """One instrument's label children, cached by label values."""

    __slots__ = ("_children", "_labels", "_lock", "_record")

    def __init__(self, labels: tuple[str, ...], record: Any = None) -> None:
        self._labels = labels
        self._record = record  # Histogram.record; None for a counter
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labels):
                raise ValueError(f"expected labels {self._labels}, got {values!r}")
            attributes = dict(zip(self._labels, (str(v) for v in values), strict=True))
            made = (
                _Counted(attributes, self._lock)
                if self._record is None
                else _Recorded(self._record, attributes)
            )
            with self._lock:
                child = self._children.setdefault(values, made)
        return child

    def observe(self, options: Any) -> Iterable[Any]:
        """The observable counter's callback: every series' cumulative value."""
        from opentelemetry.metrics import Observation

        with self._lock:
            children = list(self._children.values())
        return [Observation(c.value, c.attributes) for c in children]


def observed_counter(meter: Any, spec: MetricSpec) -> _Family:
    """A counter family counted here, reported by an observable counter named as ``spec``."""
    family = _Family(spec.labels)
    meter.create_observable_counter(
        spec.name, callbacks=[family.observe], unit=spec.unit, description=spec.help
    )
    return family


class _Set:
    """A gauge without labels, set here (a plain store: no lock, nothing the SDK can raise)
    and reported by an observable gauge when the SDK collects."""

    __slots__ = ("set", "value")

    def __init__(self) -> None:
        self.value: float = 0

        def set_(value: float) -> None:
            self.value = value

        self.set = set_

    def observe(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        return (Observation(self.value),)


def observed_gauge(meter: Any, spec: MetricSpec) -> _Set:
    """A gauge without labels, reported by an observable gauge named as ``spec``."""
    assert not spec.labels, spec.name
    gauge = _Set()
    meter.create_observable_gauge(
        spec.name, callbacks=[gauge.observe], unit=spec.unit, description=spec.help
    )
    return gauge


def _family(meter: Any, spec: MetricSpec) -> _Family:
    if spec.kind == "counter":
        return observed_counter(meter, spec)
    assert spec.buckets is not None, spec.name
    histogram = meter.create_histogram(
        spec.name,
        unit=spec.unit,
        description=spec.help,
        explicit_bucket_boundaries_advisory=[float(b) for b in spec.buckets],
    )
    return _Family(spec.labels, histogram.record)


class OtelMetrics:
    """The metric families as OpenTelemetry instruments of ``meter_provider``."""

    kind = "opentelemetry"

    if TYPE_CHECKING:  # the families are set from the catalog: adding one is a one-entry change

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, meter_provider: Any, in_flight: InFlight | None = None) -> None:
        self.meter_provider = meter_provider
        meter = meter_provider.get_meter(METER_NAME, __version__)
        self.unregistered: list[str] = []
        for spec in METRICS:
            if spec.kind == "inflight":
                continue
            setattr(self, spec.attr, _family(meter, spec))
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
        self.model_label = ModelLabels()

    def count_request(self, route: str, method: str) -> None:
        key = (route, method)
        add = self._requests_children.get(key)
        if add is None:
            add = self._requests_children[key] = self.requests.labels(route, method).inc
        add()


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


class BothFamily:
    """A family of either sink moved together: ``labels(*values).inc(n)`` or ``.observe(v)``
    (``method``) on both."""

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
                setattr(self, spec.attr, BothFamily(first, second, method))
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
