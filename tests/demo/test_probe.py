"""``otel-disconnect probe`` against the demo gateway (it sees every disconnect it causes), against
an app with Prometheus metrics but no middleware (exit 1, clear message) and against nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from otel_disconnect.tools.demo.app import GatewayConfig, create_app
from otel_disconnect.tools.demo.postgres import free_port
from otel_disconnect.tools.demo.serving import Server


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "otel_disconnect", "probe", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.fixture
def gateway(demo_pg: str, llm_url: str) -> Iterator[Server]:
    config = GatewayConfig(llm_url=llm_url, database_url=demo_pg, application_name="probe-test")
    server = Server(create_app(config, registry=CollectorRegistry())).start()
    try:
        yield server
    finally:
        server.stop()


def test_probe_sees_every_disconnect_it_causes_on_the_demo(gateway: Server) -> None:
    result = probe(gateway.url, "--count", "2", "--wait", "20")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for kind in ("request_body", "before_response", "streaming"):
        line = next(line for line in out.splitlines() if line.startswith(kind))
        assert "caused 2, detected 2" in line, line
        assert line.endswith("ok"), line
    assert "every disconnect was detected (6 of 6)" in out
    assert "LLM tokens generated after disconnect" in out


def test_probe_without_the_middleware_exits_1_with_a_clear_message() -> None:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse
    from prometheus_client import Counter, generate_latest

    registry = CollectorRegistry()
    hits = Counter("app_requests", "requests", registry=registry)
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> dict[str, str]:
        hits.inc()
        return {"ok": "yes"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode())

    server = Server(app).start()
    try:
        result = probe(server.url)
    finally:
        server.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "exposes no otel_disconnect_ metrics: is the middleware installed" in lines[0]


def test_probe_of_an_unreachable_url_is_one_line_and_exit_2() -> None:
    result = probe(f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach" in lines[0], result.stderr
