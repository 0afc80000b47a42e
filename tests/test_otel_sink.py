"""The OpenTelemetry metrics sink: chosen when it should be, and, through the real
OTLP-to-Prometheus translation of opentelemetry-exporter-prometheus, every series each dashboard
panel and alert rule queries exists with the labels the prometheus-client sink gives it.

In-process: one app on a real uvicorn with ``metrics="both"`` and a fleet channel on a real
redis-server, so the same disconnecting clients (and the same fleet events) feed both sinks; the
prometheus-client registry and the exporter's translation are compared series by series (names,
label names and values, counter values). The SDK's in-memory reader on the same MeterProvider
shows the raw data: instrument kinds, units, exemplars.

Out of process: an unchanged app under ``opentelemetry-instrument`` with
``OTEL_METRICS_EXPORTER=prometheus``, where ``metrics="auto"`` must pick OpenTelemetry, scraped
from the exporter's own port.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from otel_disconnect import instrument_app, record_tokens
from otel_disconnect.failsafe import internal_error
from otel_disconnect.fleet import events
from otel_disconnect.fleet.channel import stream_key
from otel_disconnect.telemetry import sinks
from otel_disconnect.telemetry.catalog import FLEET_METRICS, METRICS, exposed_names
from otel_disconnect.telemetry.metrics import Metrics, metrics_for
from otel_disconnect.telemetry.otel_metrics import BothMetrics, OtelMetrics
from otel_disconnect.tools.ops.alerts import ALERTS
from otel_disconnect.tools.ops.generate import DASHBOARDS

from .fleet.redis_server import RedisServer, running_redis
from .servers import RawClient, free_port, serve, wait_for
from .test_auto_instrumentation import Instrumented

exporter = pytest.importorskip("opentelemetry.exporter.prometheus")

# Label names the translation adds, which the prometheus-client sink never has.
SCOPE_LABELS = {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}


def queried_series() -> set[str]:
    """Every otel_disconnect_ sample name a dashboard panel or an alert rule queries, except the
    PostgreSQL collector's (its own collector, tested below and in tests/db)."""
    exprs = [t.expr for d in DASHBOARDS for p in d.panels for t in p.targets]
    exprs += [a.expr for a in ALERTS]
    names: set[str] = set()
    histograms = {s.name for s in METRICS if s.kind == "histogram"}
    for expr in exprs:
        for name in re.findall(r"\b(otel_disconnect_[a-z_]+)", expr):
            if name in histograms:  # histogram_quantile(..._bucket) or the family's own name
                names.add(name + "_bucket")
            elif not name.startswith("otel_disconnect_pg_"):
                names.add(name)
    return names


def samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels without the scope labels: value}, otel_disconnect_ only."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("otel_disconnect_"):
                continue
            labels = tuple(
                sorted((k, v) for k, v in sample.labels.items() if k not in SCOPE_LABELS)
            )
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


# -- which sink ------------------------------------------------------------------------------


def test_auto_picks_opentelemetry_only_for_a_provider_that_exports() -> None:
    with_reader = MeterProvider(metric_readers=[InMemoryMetricReader()])
    assert sinks.choose("auto", None, with_reader) == "opentelemetry"
    # opentelemetry-instrument with OTEL_METRICS_EXPORTER=none installs a reader-less provider.
    assert sinks.choose("auto", None, MeterProvider()) == "prometheus"
    assert sinks.choose("auto", CollectorRegistry(), with_reader) == "prometheus"
    assert sinks.choose("both", CollectorRegistry(), None) == "both"
    from opentelemetry.metrics import NoOpMeterProvider

    assert sinks.choose("auto", None, NoOpMeterProvider()) == "prometheus"



def test_metrics_option_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_disconnect import DisconnectMiddleware

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    registry = CollectorRegistry()
    mw = DisconnectMiddleware(lambda *a: None, registry=registry, meter_provider=provider)
    assert isinstance(mw.recorder.metrics, Metrics)  # a registry was passed: prometheus
    monkeypatch.setenv("OTEL_DISCONNECT_METRICS", "opentelemetry")
    mw = DisconnectMiddleware(lambda *a: None, registry=registry, meter_provider=provider)
    assert isinstance(mw.recorder.metrics, OtelMetrics)
    # What asks metrics_for(registry) later (internal errors, database hooks) gets that sink.
    assert metrics_for(registry) is mw.recorder.metrics
    mw = DisconnectMiddleware(lambda *a: None, registry=registry, metrics="both")
    assert isinstance(mw.recorder.metrics, BothMetrics)
    monkeypatch.setenv("OTEL_DISCONNECT_METRICS", "otlp")
    with pytest.raises(ValueError, match="OTEL_DISCONNECT_METRICS='otlp'"):
        DisconnectMiddleware(lambda *a: None)
    with pytest.raises(ValueError, match="metrics='x'"):
        DisconnectMiddleware(lambda *a: None, metrics="x")


def test_a_failing_meter_provider_leaves_prometheus_metrics() -> None:
    from otel_disconnect import DisconnectMiddleware

    class Broken:
        def get_meter(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no meter today")

    registry = CollectorRegistry()
    mw = DisconnectMiddleware(
        lambda *a: None, registry=registry, metrics="opentelemetry", meter_provider=Broken()
    )
    assert isinstance(mw.recorder.metrics, Metrics)
    assert (
        registry.get_sample_value(
            "otel_disconnect_internal_errors_total", {"where": "meter_provider"}
        )
        == 1
    )


# -- both sinks fed by the same clients --------------------------------------------------------


def build_app(
    registry: CollectorRegistry, provider: MeterProvider, engine: Any, redis_url: str
) -> FastAPI:
    from sqlalchemy import text

    app = FastAPI()
    app.state.started = []
    app.state.leaked = []

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/slow")
    async def slow(q: int = 0) -> dict[str, int]:
        app.state.started.append(("slow", q))
        await asyncio.sleep(0.4)  # goes on after the client left: outcome completed
        return {"q": q}

    @app.get("/db")
    async def db() -> dict[str, int]:
        async with engine.connect() as conn, conn.begin():
            await conn.execute(text("SELECT 1"))
            app.state.started.append(("db", 0))
            await asyncio.sleep(0.4)
        return {"db": 1}

    @app.get("/leak")
    async def leak() -> StreamingResponse:
        # A connection checked out and never returned: left open when the request ends.
        async def body() -> Any:
            conn = await engine.connect()
            app.state.leaked.append(conn)
            await conn.begin()
            await conn.execute(text("SELECT 1"))
            yield b"first\n"
            await asyncio.sleep(30)
            yield b"never\n"

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/generate")
    async def generate() -> dict[str, int]:
        # An engine that keeps generating after the client left (no cancellation).
        for i in range(20):
            record_tokens(1, model="sim")
            if i == 2:
                app.state.started.append(("generate", 0))
            await asyncio.sleep(0.01)
        return {"tokens": 20}

    @app.get("/abort")
    async def abort() -> dict[str, int]:
        # What the vLLM engine source does when vLLM aborts a request after its client left
        # (tests/engines/test_vllm.py drives it inside vLLM itself).
        from otel_disconnect.context import current_state
        from otel_disconnect.llm.vllm_engine import EngineRequest

        state = current_state()
        assert state is not None
        request = EngineRequest(state, "sim")
        request.counted(3)
        app.state.started.append(("abort", 0))
        await state.wait_disconnected()
        request.aborted()
        return {}

    instrument_app(
        app,
        engines=[engine],
        registry=registry,
        metrics="both",
        meter_provider=provider,
        tracer_provider=TracerProvider(),
        redis_url=redis_url,  # the fleet channel's series too
        fleet=FLEET,
    )
    return app


def abandon(port: int, path: str, started: list[Any], key: tuple[str, int] | None) -> None:
    # Counted before the request is sent: a fast handler may mark its start before this thread
    # looks again, and a count taken after it would then wait for a second start.
    before = started.count(key) if key is not None else 0
    with RawClient(port) as client:
        client.request("GET", path)
        if key is None:
            client.read_until(b"first")
        else:
            wait_for(lambda: started.count(key) > before, timeout=10)


FLEET = "otel-sink"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    pytest.importorskip("redis")
    with running_redis() as server:
        yield server


def from_the_fleet(redis: RedisServer) -> None:
    """What other processes of the fleet write: one event heard, one foreign, one malformed."""
    raw, key = redis.client(), stream_key(FLEET)
    raw.xadd(key, {"e": events.over(FLEET, "elsewhere", time.time(), "app", 7)})
    raw.xadd(key, {"e": events.over("another-fleet", "elsewhere", time.time(), "app", 8)})
    raw.xadd(key, {"e": b"not json"})


@pytest.fixture(scope="module")
def both_sinks(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[dict[str, Any]]:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from sqlalchemy.ext.asyncio import create_async_engine

    db_path = tmp_path_factory.mktemp("otel-sink") / "app.db"
    engine = create_async_engine(f"sqlite+aiosqlite:///{db_path}")
    memory = InMemoryMetricReader()
    # The exporter registers its translating collector in the global REGISTRY (its only way);
    # other tests' middlewares register the package's own families there too, so the collector
    # is read from a registry of its own.
    prometheus_reader = PrometheusMetricReader()
    translating = CollectorRegistry()
    collector = prometheus_reader._collector
    REGISTRY.unregister(collector)
    translating.register(collector)
    provider = MeterProvider(metric_readers=[memory, prometheus_reader])
    registry = CollectorRegistry()
    app = build_app(registry, provider, engine, redis_server.url)
    started: list[Any] = app.state.started
    try:
        with serve(app, "uvicorn-h11") as server:
            with RawClient(server.port) as client:
                client.request("GET", "/hello", headers={"Connection": "close"})
                client.read_all()
            # The channel started with the first request; its reader reads what comes after.
            wait_for(lambda: registry.get_sample_value("otel_disconnect_fleet_channel_up") == 1)
            from_the_fleet(redis_server)
            for q in (1, 1):  # the second is a retry of the first
                abandon(server.port, f"/slow?q={q}", started, ("slow", q))
            abandon(server.port, "/db", started, ("db", 0))
            abandon(server.port, "/generate", started, ("generate", 0))
            abandon(server.port, "/abort", started, ("abort", 0))
            abandon(server.port, "/leak", started, None)
            internal_error("test_fault", registry)  # goes to the sink chosen for the registry
            sink = metrics_for(registry)

            def settled() -> bool:
                # Every request ended (no zombie left) and generation after disconnect observed;
                # every disconnect's event written to Redis, the fleet's events read.
                text = generate_latest(registry).decode()
                found = samples(text)
                counted = found.get("otel_disconnect_client_disconnects_total", {})
                disconnects = sum(counted.values())
                fleet = {
                    name: sum(found.get(f"otel_disconnect_fleet_{name}", {}).values())
                    for name in ("events_published_total", "events_received_total",
                                 "events_dropped_total", "events_queued")
                }
                return (
                    'otel_disconnect_inflight_requests{client="disconnected"} 0.0' in text
                    and "otel_disconnect_llm_generation_after_disconnect_seconds_count" in text
                    and "otel_disconnect_db_checkins_total" in text
                    and "otel_disconnect_db_connections_left_open_total" in text
                    and disconnects > 0
                    and fleet["events_published_total"] == disconnects
                    and fleet["events_received_total"] == 1
                    and fleet["events_dropped_total"] == 2
                    and fleet["events_queued"] == 0
                )

            wait_for(settled, timeout=15, interval=0.05)
            for conn in app.state.leaked:
                asyncio.run_coroutine_threadsafe(conn.close(), server.loop).result(timeout=10)
            yield {
                "prometheus": generate_latest(registry).decode(),
                "translated": generate_latest(translating).decode(),
                "memory": memory.get_metrics_data(),
                "sink": sink,
            }
    finally:
        translating.unregister(collector)
        with contextlib.suppress(Exception):  # its shutdown unregisters it from REGISTRY
            provider.shutdown()
        engine.sync_engine.dispose()


def test_every_queried_series_exists_with_the_same_labels(both_sinks: dict[str, Any]) -> None:
    assert isinstance(both_sinks["sink"], BothMetrics)
    direct = samples(both_sinks["prometheus"])
    translated = samples(both_sinks["translated"])
    wanted = queried_series()
    assert wanted  # the dashboards and rules do query the package's series
    assert {n for n in wanted if n.startswith("otel_disconnect_fleet_")} == {
        "otel_disconnect_fleet_channel_up",
        "otel_disconnect_fleet_events_queued",
        "otel_disconnect_fleet_events_published_total",
        "otel_disconnect_fleet_events_received_total",
        "otel_disconnect_fleet_events_dropped_total",
    }
    assert not wanted - set(direct), f"the load does not produce {sorted(wanted - set(direct))}"
    missing = wanted - set(translated)
    assert not missing, f"not through the translation: {sorted(missing)}"
    for name in sorted(wanted):
        # Same series (label names and values) on both paths, and the same counts.
        assert set(translated[name]) == set(direct[name]), name
        if name.endswith(("_total", "_count", "_bucket")):
            assert translated[name] == direct[name], name


def test_every_family_translates_to_its_prometheus_names(both_sinks: dict[str, Any]) -> None:
    translated = samples(both_sinks["translated"])
    direct = samples(both_sinks["prometheus"])
    for spec in METRICS + FLEET_METRICS:
        for name in exposed_names(spec):
            # A family this load never touched is absent on both paths alike.
            assert (name in translated) == (name in direct), name
    assert not {n for n in translated if n not in direct}, "names only the translation makes"


def test_the_raw_otlp_data(both_sinks: dict[str, Any]) -> None:
    metrics = {
        m.name: m
        for rm in both_sinks["memory"].resource_metrics
        for sm in rm.scope_metrics
        if sm.scope.name == "otel_disconnect"
        for m in sm.metrics
    }
    by_name = {s.name: s for s in METRICS + FLEET_METRICS}
    for name, metric in metrics.items():
        spec = by_name[name]
        assert metric.unit == spec.unit, name
        kind = type(metric.data).__name__
        if spec.kind == "counter":
            assert (kind, metric.data.is_monotonic) == ("Sum", True), name
        elif spec.kind == "inflight":
            assert (kind, metric.data.is_monotonic) == ("Sum", False), name
        elif spec.kind == "gauge":
            assert kind == "Gauge", name
        else:
            assert kind == "Histogram", name
            point = metric.data.data_points[0]
            assert list(point.explicit_bounds) == [float(b) for b in spec.buckets or ()], name
    # Exemplars: the work and the generation after disconnect carry the request's trace id
    # (the generation is observed from a timer, outside the request's context).
    for name in (
        "otel_disconnect_work_after_disconnect_seconds",
        "otel_disconnect_llm_generation_after_disconnect_seconds",
    ):
        exemplars = [e for p in metrics[name].data.data_points for e in p.exemplars]
        assert exemplars and all(e.trace_id for e in exemplars), name


# -- an unchanged app under opentelemetry-instrument ------------------------------------------


@pytest.fixture
def exported() -> Iterator[tuple[Instrumented, int]]:
    port = free_port()
    server = Instrumented(
        "tests.sample.fastapi_app:app",
        {
            "OTEL_METRICS_EXPORTER": "prometheus",
            "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
            "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
        },
    )
    try:
        wait_for(lambda: server.metrics() != "", timeout=60)
        yield server, port
    finally:
        server.stop()


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def test_opentelemetry_instrument_exports_through_the_sdk(
    exported: tuple[Instrumented, int],
) -> None:
    server, port = exported
    with RawClient(server.port) as client:
        client.request("GET", "/slow")
        wait_for(lambda: "otel_disconnect_inflight_requests" in scrape(port), timeout=10)
    with RawClient(server.port) as client:
        client.request("GET", "/hello", headers={"Connection": "close"})
        client.read_all()

    def disconnect_counted() -> dict[str, Any]:
        found = samples(scrape(port))
        return found if "otel_disconnect_client_disconnects_total" in found else {}

    found = wait_for(disconnect_counted, timeout=15, interval=0.05)
    (labels,) = found["otel_disconnect_client_disconnects_total"]
    assert set(dict(labels)) == {"route", "method", "phase", "outcome"}
    assert dict(labels)["route"] == "/slow" and dict(labels)["phase"] == "before_response"
    requests = found["otel_disconnect_requests_total"]
    assert {dict(k)["route"] for k in requests} >= {"/slow", "/hello"}
    assert "otel_disconnect_client_wait_seconds_bucket" in found
    assert "otel_disconnect_work_after_disconnect_seconds_bucket" in found
    # The SDK's resource is on target_info, one per process: no multi-process directory needed.
    assert "target_info{" in scrape(port) and 'service_name="sample"' in scrape(port)


# -- smaller pieces ------------------------------------------------------------------------------


def _points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    data = reader.get_metrics_data()
    return {
        m.name: [(dict(p.attributes), p.value) for p in m.data.data_points]
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
        if hasattr(m.data.data_points[0], "value")
    }


def test_both_sinks_move_together_in_multiprocess_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # prometheus-client moves shared-memory gauges there; the OpenTelemetry side keeps its sets.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    reader = InMemoryMetricReader()
    registry = CollectorRegistry()
    sink = sinks.sink_for("both", registry, MeterProvider(metric_readers=[reader]))
    assert sink.in_flight is not sink.prometheus.in_flight
    state = object()
    sink.in_flight.arrived(state)
    sink.in_flight.disconnected(state)
    inflight = dict(
        (a["client"], v) for a, v in _points(reader)["otel_disconnect_inflight_requests"]
    )
    assert inflight == {"connected": 0, "disconnected": 1}
    assert sink.prometheus.inflight_disconnected._value.get() == 1
    sink.in_flight.zombie_ended(state)
    inflight = dict(
        (a["client"], v) for a, v in _points(reader)["otel_disconnect_inflight_requests"]
    )
    assert inflight == {"connected": 0, "disconnected": 0}
    assert sink.prometheus.inflight_disconnected._value.get() == 0


def test_pg_collector_as_observable_gauges_reports_down() -> None:
    pytest.importorskip("psycopg")
    from otel_disconnect import PgActivityCollector

    reader = InMemoryMetricReader()
    port = free_port()  # nothing listens there
    collector = PgActivityCollector(
        f"host=127.0.0.1 port={port} user=x dbname=x",
        metrics="opentelemetry",
        meter_provider=MeterProvider(metric_readers=[reader]),
        connect_timeout_s=1,
    )
    try:
        points = _points(reader)
        assert points["otel_disconnect_pg_up"] == [({}, 0)]
    finally:
        collector.close()
