"""On trio (anyio's trio backend, Hypercorn's trio worker) otel-disconnect steps aside: requests
pass through unchanged, with one warning per process, never an error per request."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from otel_disconnect import DisconnectMiddleware, middleware

from .sample.trio_app import inner
from .servers import free_port, wait_for

trio = pytest.importorskip("trio", reason="trio is not installed")
ROOT = Path(__file__).resolve().parent.parent


async def _requests(app: Any) -> list[tuple[int, bytes]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        out = []
        for _ in range(3):
            r = await client.get("/hello")
            out.append((r.status_code, r.content))
            r = await client.post("/echo", content=b"abc")
            out.append((r.status_code, r.content))
        return out


def test_anyio_trio_backend_passes_through_with_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(middleware, "_warned", set())
    registry = CollectorRegistry()
    wrapped = DisconnectMiddleware(inner, registry=registry)
    bare = trio.run(_requests, inner)
    with caplog.at_level(logging.WARNING, logger="otel_disconnect"):
        got = trio.run(_requests, wrapped)
    assert got == bare == [(200, b"hello"), (200, b"cba")] * 3
    records = [r for r in caplog.records if r.name == "otel_disconnect"]
    assert [r.levelno for r in records] == [logging.WARNING], records
    assert "asyncio only" in records[0].getMessage()
    assert (
        registry.get_sample_value(
            "otel_disconnect_internal_errors_total", {"where": "request_start"}
        )
        is None
    )


def test_hypercorn_trio_worker_passes_through_with_one_warning(tmp_path: Path) -> None:
    pytest.importorskip("hypercorn", reason="Hypercorn is not installed")
    port = free_port()
    log = tmp_path / "stderr"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hypercorn",
                "--worker-class",
                "trio",
                "--bind",
                f"127.0.0.1:{port}",
                "tests.sample.trio_app:app",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=err,
        )
    try:

        def hello() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/hello", timeout=2)
            except httpx.TransportError:
                return None

        first = wait_for(hello, timeout=60)
        assert (first.status_code, first.content) == (200, b"hello")
        for _ in range(3):
            r = httpx.post(f"http://127.0.0.1:{port}/echo", content=b"abc", timeout=5)
            assert (r.status_code, r.content) == (200, b"cba")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    text = log.read_text()
    assert text.count("otel-disconnect supports asyncio only") == 1, text
    assert "internal error" not in text, text
