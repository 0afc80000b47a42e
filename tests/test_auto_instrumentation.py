"""``opentelemetry-instrument uvicorn app:app`` on unchanged apps, as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .servers import RawClient, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class Instrumented:
    def __init__(self, target: str, extra_env: dict[str, str]) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "OTEL_SERVICE_NAME": "sample",
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            **extra_env,
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [
                str(BIN / "opentelemetry-instrument"),
                str(BIN / "uvicorn"),
                target,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            assert self.proc.poll() is None, "".join(self.output)
            return ""

    def sample(self, name: str, **labels: str) -> float:
        for line in self.metrics().splitlines():
            match = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
            if not match or match.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match.group(3))
        return 0.0

    def spans(self) -> list[dict[str, Any]]:
        """Spans the console exporter printed (one JSON object per span)."""
        text = "".join(self.output)
        spans, depth, start = [], 0, None
        for i, ch in enumerate(text):
            if ch == "{":
                if depth == 0:
                    start = i
                depth += 1
            elif ch == "}" and depth:
                depth -= 1
                if depth == 0 and start is not None:
                    try:
                        obj = json.loads(text[start : i + 1])
                    except ValueError:
                        continue
                    if isinstance(obj, dict) and "context" in obj:
                        spans.append(obj)
        return spans

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def instrumented(request: pytest.FixtureRequest) -> Iterator[Instrumented]:
    target, extra_env = request.param
    server = Instrumented(target, extra_env)
    try:
        wait_for(lambda: server.metrics() != "", timeout=60)
        yield server
    finally:
        server.stop()


CASES = [
    pytest.param(("tests.sample.fastapi_app:app", {}), id="fastapi"),
    pytest.param(("tests.sample.starlette_app:app", {}), id="starlette-with-otel-starlette"),
    pytest.param(
        ("tests.sample.starlette_app:app", {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "starlette"}),
        id="starlette-without-otel-starlette",
    ),
]


@pytest.mark.parametrize("instrumented", CASES, indirect=True)
def test_unchanged_app_gets_disconnect_attributes(instrumented: Instrumented) -> None:
    with RawClient(instrumented.port) as client:
        client.request("GET", "/slow")
        wait_for(
            lambda: (
                instrumented.sample("otel_disconnect_inflight_requests", client="connected") == 1
            )
        )
    wait_for(
        lambda: (
            instrumented.sample(
                "otel_disconnect_client_disconnects_total",
                route="/slow",
                method="GET",
                phase="before_response",
                outcome="completed",
            )
            == 1
        ),
        timeout=15,
    )

    def server_spans() -> list[dict[str, Any]]:
        return [
            s
            for s in instrumented.spans()
            if s.get("kind") == "SpanKind.SERVER" and "/slow" in s.get("name", "")
        ]

    spans = wait_for(server_spans, timeout=15)
    assert len(spans) == 1, "exactly one server span: the app was not wrapped twice"
    attrs = spans[0]["attributes"]
    assert attrs["disconnect.detected"] is True
    assert attrs["disconnect.phase"] == "before_response"
    assert attrs["disconnect.outcome"] == "completed"
    events = [e["name"] for e in spans[0]["events"]]
    assert "client.disconnect" in events
