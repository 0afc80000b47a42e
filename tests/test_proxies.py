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


def test_bench_script_measures_the_table() -> None:
    """bench/proxies.py, which measured the README's figures, still runs and agrees with it."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import require_binary

    require_binary("caddy")
    bench = Path(__file__).resolve().parent.parent / "bench" / "proxies.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--trials", "1", "--proxies", "caddy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| caddy |")]
    assert len(rows) == 2 * len(SETTINGS["caddy"]), run.stdout  # printed as measured, then all
    for row in rows[: len(SETTINGS["caddy"])]:
        setting, *cells = (c.strip() for c in row.strip("|").split("|")[1:])
        for point, cell in zip(POINTS, cells, strict=True):
            detected = EXPECTED[("caddy", setting)][point].detected
            assert cell.startswith("1/1: " if detected else "0/1"), (setting, point, cell)


@pytest.mark.parametrize("body_after_head", [True, False], ids=["body-after-head", "one-read"])
def test_haproxy_abortonclose_passes_on_a_request_whose_body_came_after_its_head(
    upstream: Upstream, body_after_head: bool
) -> None:
    """HAProxy 2.6 with ``option abortonclose``: a client that leaves before the response is
    passed on when the request's body reached HAProxy after its head (as HTTP clients write a
    POST: head, then body), and not when the whole request arrived in one read (the GET of the
    table's cell). The order is made certain, not timed: the body is sent only once the app has
    the request's head, so HAProxy must have read the two apart."""
    from tests.proxy_matrix import WORK_S, _reset, _route_span
    from tests.servers import RawClient, wait_for

    body = b"x" * 1000
    _reset(upstream)
    with run_proxy("haproxy", upstream.server.port, "abortonclose") as proxy:
        with RawClient(proxy.port) as client:
            path = f"/upload?work={WORK_S}"
            headers = {"Content-Length": str(len(body))}
            if body_after_head:
                client.request("POST", path, headers=headers, send_body=False)
                upstream.signals.wait("upload.started")
                client.send(body)
            else:
                client.request("POST", path, body=body)
            wait_for(lambda: upstream.signals.values.get("upload.bytes") == len(body), timeout=10)
        span = wait_for(lambda: _route_span(upstream.telemetry, "/upload"), timeout=WORK_S + 10)
    attrs = dict(span.attributes or {})
    if body_after_head:
        assert attrs.get("disconnect.detected") is True, attrs
        assert attrs["disconnect.phase"] == "before_response", attrs
        assert attrs["disconnect.outcome"] == "cancelled", attrs
        assert "upload.finished" not in upstream.signals.values
    else:
        assert not attrs.get("disconnect.detected"), attrs
        assert "upload.finished" in upstream.signals.values  # worked to its end for nobody
