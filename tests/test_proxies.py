"""Client hang-ups through real nginx, HAProxy and Caddy: what the README's proxy table claims.

One uvicorn (httptools) app for the module, each proxy and setting started once (a module
fixture), and for every disconnect point one request that hangs up there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from tests.apps import Signals, build_app
from tests.conftest import Telemetry
from tests.proxies import SETTINGS, Proxy, run_proxy
from tests.proxy_matrix import (
    EXPECTED,
    POINTS,
    STREAM_STEPS_BOUND,
    Upstream,
    run_case,
)
from tests.servers import serve

CELLS = [(kind, setting) for kind, settings in SETTINGS.items() for setting in settings]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(CollectorRegistry(), provider, exporter)
    signals = Signals()
    app = build_app(signals, cancel_on_disconnect=True, **telemetry.options())
    with serve(app, "uvicorn-httptools") as server:
        yield Upstream(server, signals, telemetry)
    provider.shutdown()


@pytest.fixture(scope="module", params=CELLS, ids=[f"{k}-{s}" for k, s in CELLS])
def proxy(request: pytest.FixtureRequest, upstream: Upstream) -> Iterator[Proxy]:
    kind, setting = request.param
    with run_proxy(kind, upstream.server.port, setting) as running:
        yield running


@pytest.mark.parametrize("point", POINTS)
def test_hang_up_through_the_proxy(proxy: Proxy, upstream: Upstream, point: str) -> None:
    expect = EXPECTED[(proxy.kind, proxy.settings)][point]
    seen = run_case(upstream, proxy, point, expect)
    assert seen.reached_app is expect.reaches_app, seen
    assert seen.detected is expect.detected, seen
    if not expect.reaches_app:
        assert (
            upstream.telemetry.value(
                "otel_disconnect_requests_total", route="/upload", method="POST"
            )
            == 0
        )
        return
    if expect.detected:
        assert seen.phase == point, seen
        # cancel_on_disconnect: the work stopped at detection, before its natural end (the
        # /work handler never finished, the stream was cut, the upload handler stopped reading).
        assert seen.outcome == "cancelled", seen
        assert seen.delay_s is not None and seen.delay_s >= 0, seen
        if point == "before_response":
            assert "work.finished" not in upstream.signals.values, seen
        if point == "streaming":
            assert seen.app_steps_after_close is not None
            assert seen.app_steps_after_close <= STREAM_STEPS_BOUND, seen
    elif point == "before_response":
        # Not detected: the app worked to its end for nobody.
        assert "work.finished" in upstream.signals.values, seen
