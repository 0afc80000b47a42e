"""The prometheus-client sink: every metric of ``catalog.METRICS``, defined once per registry.

A middleware, a token source or a database hook asks ``metrics_for(registry)`` and gets the same
object for the same registry, so two middlewares on one registry never register a name twice.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ..compat.prometheus import fast_dec, fast_inc
from .catalog import CLIENT_WAIT_BUCKETS, METRICS, PREFIX, WORK_AFTER_BUCKETS, MetricSpec

logger = logging.getLogger("otel_disconnect")


MAX_MODELS = 20
OTHER_MODEL = "other"


__all__ = [
    "CLIENT_WAIT_BUCKETS",
    "PREFIX",
    "WORK_AFTER_BUCKETS",
    "Metrics",
    "metrics_for",
    "prometheus_metrics",
]


def _family(spec: MetricSpec) -> Any:
    """One unregistered prometheus-client family for ``spec``."""
    labels = list(spec.labels)
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, labels, registry=None)
    if spec.kind == "histogram":
        assert spec.buckets is not None, spec.name
        return Histogram(spec.name, spec.help, labels, buckets=spec.buckets, registry=None)
    # livesum: in multi-process mode the exposition sums the live workers' values.
    return Gauge(spec.name, spec.help, labels, registry=None, multiprocess_mode="livesum")


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The metric families in one prometheus-client registry, built from ``catalog.METRICS``.

    Every family is an attribute named by its ``MetricSpec.attr``. Hot label children are
    cached: ``labels()`` costs a lock and a tuple.
    """

    kind = "prometheus"

    if TYPE_CHECKING:  # the families are set from the catalog: adding one is a one-entry change

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, registry: CollectorRegistry | None) -> None:
        # Made unregistered, then registered one by one (``_register``): a name that another
        # collector already holds must not fail start-up, nor leave half the families behind.
        self.unregistered: list[str] = []
        families = [_family(spec) for spec in METRICS]
        for spec, family in zip(METRICS, families, strict=True):
            setattr(self, spec.attr, family)
        if registry is not None:
            for family in families:
                name = _register(registry, family)
                if name is not None:
                    self.unregistered.append(name)
            if self.unregistered:
                self.internal_errors.labels("metric_name_taken").inc(len(self.unregistered))
        self.inflight_connected = self.inflight.labels("connected")
        self.inflight_disconnected = self.inflight.labels("disconnected")
        self.in_flight = InFlight(self.inflight_connected, self.inflight_disconnected)
        self._requests_children: dict[tuple[str, str], Any] = {}
        self.model_label = ModelLabels()

    def count_request(self, route: str, method: str) -> None:
        key = (route, method)
        inc = self._requests_children.get(key)
        if inc is None:
            inc = self._requests_children[key] = fast_inc(self.requests.labels(route, method))
        inc()


class ModelLabels:
    """``model`` label values, shared by both sinks: at most MAX_MODELS distinct per process,
    later ones become ``other`` (a model name comes from requests, so it must be bounded)."""

    __slots__ = ("_lock", "_models")

    def __init__(self) -> None:
        self._models: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, model: str | None) -> str:
        if not model:
            return "unknown"
        if model in self._models:
            return model
        with self._lock:
            if len(self._models) < MAX_MODELS:
                self._models.add(model)
                return model
        return OTHER_MODEL


class InFlight:
    """The two in-flight series, kept cheap on the path every request takes.

    In one process, each series is the size of a set of live request states, read when Prometheus
    scrapes: ``set.add``/``set.discard`` are single C calls where a Gauge's ``inc``/``dec`` is a
    Python call taking a lock. Multi-process mode needs the values in the gauge's shared memory
    (``livesum`` adds up the live workers), so there the gauge is moved as usual.

    ``arrived(state)``: a request started; ``left(state)``: it ended with its client still there;
    ``disconnected(state)``: its client left (a zombie until it ends); ``zombie_ended(state)``.
    """

    __slots__ = ("arrived", "disconnected", "left", "live", "zombie_ended", "zombies")

    arrived: Callable[[object], None]
    left: Callable[[object], None]
    disconnected: Callable[[object], None]
    zombie_ended: Callable[[object], None]
    # The live sets, read at collection time (the OpenTelemetry sink's observable instrument
    # reads them too); None when the gauges are moved per request.
    live: set[object] | None
    zombies: set[object] | None

    def __init__(self, connected: Any, disconnected: Any, use_gauges: bool | None = None) -> None:
        """``connected``/``disconnected``: prometheus-client gauge children, or None (sets only)."""
        if use_gauges is None:
            use_gauges = _multiprocess() and connected is not None
        if use_gauges:
            self.live = self.zombies = None
            self._use_gauges(connected, disconnected)
            return
        live: set[object] = set()
        zombies: set[object] = set()
        self.live, self.zombies = live, zombies
        if connected is not None:
            connected.set_function(live.__len__)
            disconnected.set_function(zombies.__len__)

        def moved(state: object) -> None:
            live.discard(state)
            zombies.add(state)

        self.arrived, self.left = live.add, live.discard
        self.disconnected, self.zombie_ended = moved, zombies.discard

    def _use_gauges(self, connected: Any, disconnected: Any) -> None:
        inc, dec = fast_inc(connected), fast_dec(connected)
        zombie_inc, zombie_dec = fast_inc(disconnected), fast_dec(disconnected)

        def arrived(state: object) -> None:
            inc()

        def left(state: object) -> None:
            dec()

        def moved(state: object) -> None:
            dec()
            zombie_inc()

        def zombie_ended(state: object) -> None:
            zombie_dec()

        self.arrived, self.left, self.disconnected, self.zombie_ended = (
            arrived,
            left,
            moved,
            zombie_ended,
        )


def _register(registry: CollectorRegistry, metric: Any) -> str | None:
    """Register one family; its name, with one log line, when the name is taken.

    The family then still works (the package updates it as usual) but is not exported through
    this registry: otel-disconnect never takes over, or adds samples to, another collector's
    series. The other families are registered as usual.
    """
    try:
        registry.register(metric)
        return None
    except Exception as exc:
        name = str(metric.describe()[0].name)
        logger.error(
            "otel-disconnect: metric %s is not exported by %r: %s. Another collector in that "
            "registry already uses the name (a second copy of otel-disconnect, or another "
            "library); the rest of otel-disconnect's metrics are unaffected.",
            name,
            registry,
            exc,
        )
        return name


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()
# The sink a middleware chose for a registry key (telemetry.sinks), when not this registry's own.
_selected: weakref.WeakKeyDictionary[CollectorRegistry, Any] = weakref.WeakKeyDictionary()
_create_lock = threading.Lock()


def metrics_for(registry: CollectorRegistry | None = None) -> Any:
    """The sink chosen for ``registry`` (the global REGISTRY when None): the prometheus-client
    ``Metrics`` bound to it, created once, unless a middleware chose another sink for it."""
    reg = REGISTRY if registry is None else registry
    selected = _selected.get(reg)
    if selected is not None:
        return selected
    return prometheus_metrics(reg)


def once(
    table: MutableMapping[Any, Any], key: Any, lock: threading.Lock, make: Callable[[], Any]
) -> Any:
    """``table[key]``, made by ``make()`` the first time, once even when threads race."""
    found = table.get(key)
    if found is not None:
        return found
    with lock:
        found = table.get(key)
        if found is None:
            found = table[key] = make()
        return found


def prometheus_metrics(reg: CollectorRegistry) -> Metrics:
    """The prometheus-client sink bound to ``reg``, created once."""
    made: Metrics = once(_by_registry, reg, _create_lock, lambda: Metrics(reg))
    return made


def select(reg: CollectorRegistry, sink: Any) -> None:
    """Make ``sink`` what ``metrics_for(reg)`` returns from now on."""
    if isinstance(sink, Metrics) and _by_registry.get(reg) is sink:
        _selected.pop(reg, None)
    else:
        _selected[reg] = sink


def multiprocess_mode() -> bool:
    return _multiprocess()
