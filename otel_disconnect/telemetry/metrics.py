"""Every Prometheus metric of SPEC section 6, defined once per registry.

A middleware, a token source or a database hook asks ``metrics_for(registry)`` and gets the same
object for the same registry, so two middlewares on one registry never register a name twice.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger("otel_disconnect")

PREFIX = "otel_disconnect_"

# The client timeouts people actually configure (5, 10, 15, 30, 60 s) are bucket bounds, so a
# 10 s client timeout against a 30 s server timeout shows up as a step at le="10".
CLIENT_WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300)
WORK_AFTER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

MAX_MODELS = 20
OTHER_MODEL = "other"


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The metric families. Hot label children are cached: ``labels()`` costs a lock and a tuple."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        # Made unregistered, then registered one by one (``register_family``): a name that another
        # collector already holds must not fail start-up, nor leave half the families behind.
        reg: Any = None
        self.unregistered: list[str] = []
        self.registry = registry  # integrations register their own families on it
        self.requests = Counter(
            PREFIX + "requests",
            "HTTP requests seen by the disconnect middleware.",
            ["route", "method"],
            registry=reg,
        )
        self.client_disconnects = Counter(
            PREFIX + "client_disconnects",
            "Premature client disconnects: the client left before the final response body.",
            ["route", "method", "phase", "outcome"],
            registry=reg,
        )
        self.client_wait = Histogram(
            PREFIX + "client_wait_seconds",
            "How long clients that disconnected prematurely waited before leaving.",
            ["route"],
            buckets=CLIENT_WAIT_BUCKETS,
            registry=reg,
        )
        self.work_after_disconnect = Histogram(
            PREFIX + "work_after_disconnect_seconds",
            "Time the app kept working for a request after its client left.",
            ["route", "outcome"],
            buckets=WORK_AFTER_BUCKETS,
            registry=reg,
        )
        # livesum: in multi-process mode the exposition sums the live workers' values.
        self.inflight = Gauge(
            PREFIX + "inflight_requests",
            'Requests in flight; client="disconnected" are zombie requests working for nobody.',
            ["client"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.sends_after_disconnect = Counter(
            PREFIX + "sends_after_disconnect",
            "send() calls the app made after its client left.",
            ["route"],
            registry=reg,
        )
        self.bytes_after_disconnect = Counter(
            PREFIX + "bytes_after_disconnect",
            "Response body bytes the app sent after its client left.",
            ["route"],
            registry=reg,
        )
        self.retries_after_disconnect = Counter(
            PREFIX + "retries_after_disconnect",
            "Requests that repeat a request whose client disconnected within the retry window.",
            ["route"],
            registry=reg,
        )
        self.llm_tokens = Counter(
            PREFIX + "llm_tokens",
            "Output tokens generated.",
            ["route", "model"],
            registry=reg,
        )
        self.llm_tokens_after_disconnect = Counter(
            PREFIX + "llm_tokens_after_disconnect",
            "Output tokens generated after the client disconnected.",
            ["route", "model"],
            registry=reg,
        )
        self.llm_tokens_undelivered = Counter(
            PREFIX + "llm_tokens_undelivered",
            "Output tokens generated that never reached the client.",
            ["route", "model"],
            registry=reg,
        )
        self.llm_generation_after_disconnect = Histogram(
            PREFIX + "llm_generation_after_disconnect_seconds",
            "Time generation went on after the client disconnected.",
            ["route", "model"],
            buckets=WORK_AFTER_BUCKETS,
            registry=reg,
        )
        self.db_transactions_interrupted = Counter(
            PREFIX + "db_transactions_interrupted",
            "Database transactions open when the client of their request disconnected.",
            ["route", "state"],
            registry=reg,
        )
        self.db_connections_left_open = Counter(
            PREFIX + "db_connections_left_open",
            "Connections still checked out or in a transaction when a disconnected request ended.",
            ["route", "state"],
            registry=reg,
        )
        self.db_checkins = Counter(
            PREFIX + "db_checkins",
            "Pool check-ins by outcome.",
            ["outcome"],
            registry=reg,
        )
        self.internal_errors = Counter(
            PREFIX + "internal_errors",
            "Errors inside otel-disconnect; the app was not affected.",
            ["where"],
            registry=reg,
        )
        if registry is not None:
            for metric in (
                self.requests,
                self.client_disconnects,
                self.client_wait,
                self.work_after_disconnect,
                self.inflight,
                self.sends_after_disconnect,
                self.bytes_after_disconnect,
                self.retries_after_disconnect,
                self.llm_tokens,
                self.llm_tokens_after_disconnect,
                self.llm_tokens_undelivered,
                self.llm_generation_after_disconnect,
                self.db_transactions_interrupted,
                self.db_connections_left_open,
                self.db_checkins,
                self.internal_errors,
            ):
                name = register_family(registry, metric)
                if name is not None:
                    self.unregistered.append(name)
            if self.unregistered:
                self.internal_errors.labels("metric_name_taken").inc(len(self.unregistered))
        self.inflight_connected = self.inflight.labels("connected")
        self.inflight_disconnected = self.inflight.labels("disconnected")
        self.in_flight = InFlight(self.inflight_connected, self.inflight_disconnected)
        self._requests_children: dict[tuple[str, str], Any] = {}
        self._models: set[str] = set()
        self._lock = threading.Lock()

    def count_request(self, route: str, method: str) -> None:
        key = (route, method)
        inc = self._requests_children.get(key)
        if inc is None:
            inc = self._requests_children[key] = _fast_inc(self.requests.labels(route, method))
        inc()

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


class InFlight:
    """The two in-flight series, kept cheap on the path every request takes.

    In one process, each series is the size of a set of live request states, read when Prometheus
    scrapes: ``set.add``/``set.discard`` are single C calls where a Gauge's ``inc``/``dec`` is a
    Python call taking a lock. Multi-process mode needs the values in the gauge's shared memory
    (``livesum`` adds up the live workers), so there the gauge is moved as usual.

    ``arrived(state)``: a request started; ``left(state)``: it ended with its client still there;
    ``disconnected(state)``: its client left (a zombie until it ends); ``zombie_ended(state)``.
    """

    __slots__ = ("arrived", "disconnected", "left", "zombie_ended")

    arrived: Callable[[object], None]
    left: Callable[[object], None]
    disconnected: Callable[[object], None]
    zombie_ended: Callable[[object], None]

    def __init__(self, connected: Any, disconnected: Any) -> None:
        if _multiprocess():
            self._use_gauges(connected, disconnected)
            return
        live: set[object] = set()
        zombies: set[object] = set()
        connected.set_function(live.__len__)
        disconnected.set_function(zombies.__len__)

        def moved(state: object) -> None:
            live.discard(state)
            zombies.add(state)

        self.arrived, self.left = live.add, live.discard
        self.disconnected, self.zombie_ended = moved, zombies.discard

    def _use_gauges(self, connected: Any, disconnected: Any) -> None:
        inc, dec = _fast_inc(connected), _fast_dec(connected)
        zombie_inc, zombie_dec = _fast_inc(disconnected), _fast_dec(disconnected)

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


def _fast_inc(child: Any) -> Any:
    value = getattr(child, "_value", None)
    inc = getattr(value, "inc", None)
    return functools.partial(inc, 1) if inc is not None else child.inc


def _fast_dec(child: Any) -> Any:
    value = getattr(child, "_value", None)
    inc = getattr(value, "inc", None)
    return functools.partial(inc, -1) if inc is not None else child.dec


def register_family(registry: CollectorRegistry, metric: Any) -> str | None:
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
_create_lock = threading.Lock()


def metrics_for(registry: CollectorRegistry | None = None) -> Metrics:
    """The Metrics bound to ``registry`` (the global REGISTRY when None), created once."""
    reg = REGISTRY if registry is None else registry
    found = _by_registry.get(reg)
    if found is not None:
        return found
    with _create_lock:
        found = _by_registry.get(reg)
        if found is None:
            found = _by_registry[reg] = Metrics(reg)
        return found


def multiprocess_mode() -> bool:
    return _multiprocess()
