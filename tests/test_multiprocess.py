"""Multi-process servers (PROMETHEUS_MULTIPROC_DIR): every worker's counts reach /metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from .servers import RawClient, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def _value(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_two_workers_share_their_metrics(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.sample.instrumented_app:app", "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
        cwd=ROOT, env=env,
    )
    try:
        wait_for(lambda: _scrape(port), timeout=60)
        for _ in range(40):  # new connections: the kernel spreads them over both workers
            with RawClient(port) as client:
                client.request("GET", "/hello", headers={"Connection": "close"})
                client.read_all()
        with RawClient(port) as client:
            client.request("GET", "/slow")
            wait_for(lambda: _value(_scrape(port), "otel_disconnect_inflight_requests",
                                    'client="connected"') == 1)
        text = wait_for(lambda: (t := _scrape(port)) and _value(
            t, "otel_disconnect_client_disconnects_total",
            'method="GET",outcome="completed",phase="before_response",route="/slow"') == 1 and t,
            timeout=15)
        assert _value(text, "otel_disconnect_requests_total", 'method="GET",route="/hello"') == 40
        assert _value(text, "otel_disconnect_inflight_requests", 'client="disconnected"') == 0
        assert len(list(tmp_path.glob("counter_*.db"))) >= 2  # both workers wrote their own file
    finally:
        proc.terminate()
        proc.wait(timeout=20)
