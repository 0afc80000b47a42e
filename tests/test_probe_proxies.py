"""``otel-disconnect probe`` through real nginx, HAProxy and Caddy: the verdict the README's proxy
table gives (tests/proxy_matrix.py ``PROBE_EXPECTED``), its exit status and the setting it
names."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from otel_disconnect import instrument_app
from otel_disconnect.tools.llm_sim import SimConfig, Simulator, create_app
from tests.proxies import SETTINGS, Proxy, run_proxy
from tests.proxy_matrix import POINTS, PROBE_EXPECTED
from tests.servers import ServerThread, serve

CELLS = [(kind, setting) for kind, settings in SETTINGS.items() for setting in settings]
# What the probe must name where the table says a hang-up is lost or held.
HINTS = {
    ("nginx", "default"): "proxy_request_buffering on",
    ("nginx", "ignore_client_abort"): "proxy_ignore_client_abort",
    ("haproxy", "default"): "option abortonclose passes it on",
    ("haproxy", "http-server-close"): "option abortonclose passes it on",
    ("caddy", "flush"): "flush_interval -1",
}
NAMED_BY_HEADER = {"nginx", "caddy"}  # HAProxy sets no Server or Via header
METRICS = "/otel-disconnect/metrics"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerThread]:
    # A non-streaming answer takes 3 s: the probe hangs up after 1 s, well after the proxy has
    # passed the request on (HAProxy's abortonclose does abort a request it is still connecting
    # upstream, which on a loaded machine can take longer than the probe's default 0.2 s).
    sim = Simulator(SimConfig(ttft=0.2, tokens_per_second=100, max_tokens=300))
    # The simulator serves its vLLM-named series at /metrics; the package's go beside them.
    app = instrument_app(
        create_app(simulator=sim), registry=CollectorRegistry(), metrics_path=METRICS
    )
    with serve(app, "uvicorn-httptools") as server:
        # One request first: labelled series appear once something was counted.
        with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
            assert response.status == 200
        yield server


@pytest.fixture(scope="module", params=CELLS, ids=[f"{k}-{s}" for k, s in CELLS])
def proxy(request: pytest.FixtureRequest, upstream: ServerThread) -> Iterator[Proxy]:
    kind, setting = request.param
    with run_proxy(kind, upstream.port, setting) as running:
        yield running


def test_probe_through_the_proxy(proxy: Proxy) -> None:
    expected = PROBE_EXPECTED[(proxy.kind, proxy.settings)]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "otel_disconnect",
            "probe",
            proxy.url,
            "--count",
            "1",
            "--wait",
            "4",
            "--delay",
            "1",
            "--metrics-url",
            proxy.url + METRICS,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = result.stdout + result.stderr
    lines = {
        line.split()[0]: line
        for line in result.stdout.splitlines()
        if line.split() and line.split()[0] in POINTS
    }
    for point in POINTS:
        if not expected[point].reaches_app:
            assert "never reached the service 1" in lines[point] and lines[point].endswith("ok")
        elif expected[point].detected:
            assert "caused 1, detected 1" in lines[point] and lines[point].endswith("ok"), out
        else:
            assert lines[point].endswith("UNDETECTED"), out
    lost = [p for p in POINTS if expected[p].reaches_app and not expected[p].detected]
    assert result.returncode == (1 if lost else 0), out
    if (proxy.kind, proxy.settings) in HINTS:
        assert HINTS[(proxy.kind, proxy.settings)] in out, out
    if proxy.kind in NAMED_BY_HEADER:
        assert f"came through {proxy.kind}" in out, out
    else:
        assert "came through" not in out, out


def test_identify_the_proxy_from_server_and_via_headers() -> None:
    from otel_disconnect.tools.proxy_advice import advice, identify

    assert identify([{"server": "Caddy, uvicorn"}]) == "caddy"  # Caddy adds a second Server
    assert identify([{"server": "nginx/1.22.1"}]) == "nginx"
    assert identify([{"server": "uvicorn"}, {"via": "1.1 haproxy"}]) == "haproxy"
    assert identify([{"server": "uvicorn"}]) is None
    # Unknown proxy: what to check on each of them.
    unknown = advice(None, ["before_response"])
    assert [line.split(":")[1].strip() for line in unknown] == ["nginx", "Caddy", "HAProxy"]
    assert advice("nginx", ["before_response"]) == [
        "before_response: nginx: proxy_ignore_client_abort on keeps the upstream request "
        "running after the client left; set it off (the default)"
    ]
