"""Every metric of the README's table, declared once; both sinks are built from this table.

To add a metric, add one ``MetricSpec`` to ``METRICS``: the prometheus-client sink
(``metrics.Metrics``) and the OpenTelemetry sink (``otel_metrics.OtelMetrics``) both get an
attribute ``attr`` with ``.labels(*values).inc(n)`` (counter) or ``.observe(v)`` (histogram).
The fleet channel's, ``FLEET_METRICS``, are made the same way by ``fleet/metrics.py`` (gauges
with ``.set(v)``).

Names are chosen so the standard OTLP-to-Prometheus translation (the collector's ``prometheus``
and ``prometheusremotewrite`` exporters, Prometheus' OTLP receiver, opentelemetry-exporter-
prometheus) gives back exactly the prometheus-client names:

- the OpenTelemetry instrument is called ``name`` with underscores (dots would survive as dots
  under Prometheus' UTF-8 translation strategies);
- counters are named without ``_total``: prometheus-client and the translators both add it to a
  monotonic sum;
- a unit in braces (``{request}``) is an annotation the translators drop; ``s`` becomes
  ``_seconds``, which the histogram names already end with, so nothing is appended twice. Bytes
  are ``{byte}``, not ``By``: opentelemetry-exporter-prometheus appends ``_bytes`` to any name
  not ending with it, and ``bytes_after_disconnect_total`` does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "otel_disconnect_"

# The client timeouts people actually configure (5, 10, 15, 30, 60 s) are bucket bounds, so a
# 10 s client timeout against a 30 s server timeout shows up as a step at le="10".
CLIENT_WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300)
WORK_AFTER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

Kind = Literal["counter", "histogram", "inflight", "gauge"]


@dataclass(frozen=True)
class MetricSpec:
    attr: str  # the attribute on either sink
    name: str  # the Prometheus family name (counters: without _total)
    kind: Kind
    unit: str  # UCUM, as OpenTelemetry wants it
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] | None = None  # histograms only


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "requests",
        PREFIX + "requests",
        "counter",
        "{request}",
        ("route", "method"),
        "HTTP requests seen by the disconnect middleware.",
    ),
    MetricSpec(
        "client_disconnects",
        PREFIX + "client_disconnects",
        "counter",
        "{disconnect}",
        ("route", "method", "phase", "outcome"),
        "Premature client disconnects: the client left before the final response body.",
    ),
    MetricSpec(
        "client_wait",
        PREFIX + "client_wait_seconds",
        "histogram",
        "s",
        ("route",),
        "How long clients that disconnected prematurely waited before leaving.",
        buckets=CLIENT_WAIT_BUCKETS,
    ),
    MetricSpec(
        "work_after_disconnect",
        PREFIX + "work_after_disconnect_seconds",
        "histogram",
        "s",
        ("route", "outcome"),
        "Time the app kept working for a request after its client left.",
        buckets=WORK_AFTER_BUCKETS,
    ),
    # Read when the metrics are collected, from the sets of live requests (metrics.InFlight).
    MetricSpec(
        "inflight",
        PREFIX + "inflight_requests",
        "inflight",
        "{request}",
        ("client",),
        'Requests in flight; client="disconnected" are zombie requests working for nobody.',
    ),
    MetricSpec(
        "sends_after_disconnect",
        PREFIX + "sends_after_disconnect",
        "counter",
        "{send}",
        ("route",),
        "send() calls the app made after its client left.",
    ),
    MetricSpec(
        "bytes_after_disconnect",
        PREFIX + "bytes_after_disconnect",
        "counter",
        "{byte}",
        ("route",),
        "Response body bytes the app sent after its client left.",
    ),
    MetricSpec(
        "retries_after_disconnect",
        PREFIX + "retries_after_disconnect",
        "counter",
        "{request}",
        ("route",),
        "Requests that repeat a request whose client disconnected within the retry window.",
    ),
    MetricSpec(
        "llm_tokens",
        PREFIX + "llm_tokens",
        "counter",
        "{token}",
        ("route", "model"),
        "Output tokens generated.",
    ),
    MetricSpec(
        "llm_tokens_after_disconnect",
        PREFIX + "llm_tokens_after_disconnect",
        "counter",
        "{token}",
        ("route", "model"),
        "Output tokens generated after the client disconnected.",
    ),
    MetricSpec(
        "llm_tokens_undelivered",
        PREFIX + "llm_tokens_undelivered",
        "counter",
        "{token}",
        ("route", "model"),
        "Output tokens generated that never reached the client.",
    ),
    MetricSpec(
        "llm_generation_after_disconnect",
        PREFIX + "llm_generation_after_disconnect_seconds",
        "histogram",
        "s",
        ("route", "model"),
        "Time generation went on after the client disconnected.",
        buckets=WORK_AFTER_BUCKETS,
    ),
    MetricSpec(
        "db_transactions_interrupted",
        PREFIX + "db_transactions_interrupted",
        "counter",
        "{transaction}",
        ("route", "state"),
        "Database transactions open when the client of their request disconnected.",
    ),
    MetricSpec(
        "db_connections_left_open",
        PREFIX + "db_connections_left_open",
        "counter",
        "{connection}",
        ("route", "state"),
        "Connections still checked out or in a transaction when a disconnected request ended.",
    ),
    MetricSpec(
        "db_checkins",
        PREFIX + "db_checkins",
        "counter",
        "{checkin}",
        ("outcome",),
        "Pool check-ins by outcome.",
    ),
    MetricSpec(
        "llm_engine_aborted_requests",
        PREFIX + "llm_engine_aborted_requests",
        "counter",
        "{request}",
        ("model", "phase"),
        "Requests the LLM engine aborted, by the phase their client left in (connected: it had"
        " not).",
    ),
    MetricSpec(
        "llm_engine_aborted_tokens",
        PREFIX + "llm_engine_aborted_tokens",
        "counter",
        "{token}",
        ("model", "phase"),
        "Output tokens the LLM engine had generated for requests it then aborted.",
    ),
    MetricSpec(
        "internal_errors",
        PREFIX + "internal_errors",
        "counter",
        "{error}",
        ("where",),
        "Errors inside otel-disconnect; the app was not affected.",
    ),
)


# The fleet channel's own (fleet/metrics.py), made with the channel (``redis_url=``), on the sink
# chosen for its registry. Gauges are set by the channel; on OpenTelemetry observable gauges.
FLEET_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "up",
        PREFIX + "fleet_channel_up",
        "gauge",
        "",  # not "1": the translation would append _ratio to a gauge
        (),
        "1 while this process reads and writes the fleet's Redis event stream, 0 while it "
        "cannot (detection falls back to the process).",
    ),
    MetricSpec(
        "queued",
        PREFIX + "fleet_events_queued",
        "gauge",
        "{event}",
        (),
        "Events waiting in this process for Redis (bounded; down or slow Redis fills it).",
    ),
    MetricSpec(
        "published",
        PREFIX + "fleet_events_published",
        "counter",
        "{event}",
        ("kind",),
        "Disconnect events written to the fleet's Redis stream.",
    ),
    MetricSpec(
        "received",
        PREFIX + "fleet_events_received",
        "counter",
        "{event}",
        ("kind",),
        "Events from other processes of the fleet, read from its Redis stream.",
    ),
    MetricSpec(
        "dropped",
        PREFIX + "fleet_events_dropped",
        "counter",
        "{event}",
        ("reason",),
        "Events dropped: queue_full (Redis down or slow), foreign (another fleet), malformed.",
    ),
)


def exposed_names(spec: MetricSpec) -> tuple[str, ...]:
    """The sample names Prometheus stores for ``spec``, on either path."""
    if spec.kind == "counter":
        return (spec.name + "_total",)
    if spec.kind == "histogram":
        return (spec.name + "_bucket", spec.name + "_sum", spec.name + "_count")
    return (spec.name,)
