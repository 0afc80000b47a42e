"""Multi-process servers (PROMETHEUS_MULTIPROC_DIR): every worker's counts reach /metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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


def _hello(port: int) -> bytes:
    with RawClient(port) as client:
        client.request("GET", "/hello", headers={"Connection": "close"})
        body = client.read_all()
    match = re.search(rb'"pid":(\d+)', body)
    assert match, body
    return match.group(1)


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
        # Concurrent connections until both workers have answered (the kernel picks the worker).
        pids: set[bytes] = set()
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            for _ in range(50):
                pids.update(pool.map(lambda _: _hello(port), range(16)))
                sent += 16
                if len(pids) >= 2:
                    break
        assert len(pids) == 2, "both workers answered"
        with RawClient(port) as client:
            client.request("GET", "/slow")
            wait_for(lambda: _value(_scrape(port), "otel_disconnect_inflight_requests",
                                    'client="connected"') == 1)
        # The zombie's gauge is released after its counters are written (in the request's final
        # ``finally``): a scrape answered by the other worker can fall between the two.
        text = wait_for(lambda: (t := _scrape(port)) and _value(
            t, "otel_disconnect_client_disconnects_total",
            'method="GET",outcome="completed",phase="before_response",route="/slow"') == 1
            and _value(t, "otel_disconnect_inflight_requests", 'client="disconnected"') == 0
            and t, timeout=15)
        assert _value(text, "otel_disconnect_requests_total", 'method="GET",route="/hello"') == sent
        assert _value(text, "otel_disconnect_inflight_requests", 'client="disconnected"') == 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_dead_workers_leave_the_in_flight_gauge(tmp_path: Path) -> None:
    """uvicorn never calls mark_process_dead: a worker killed with a request in flight must not
    hold the livesum gauge up for ever. Its counters still count."""
    from .multiproc_server import both_workers, scrape, uvicorn_workers, value

    with uvicorn_workers(tmp_path) as port:
        pids, sent = both_workers(port)
        with RawClient(port) as client:
            client.request("GET", "/hold")
            wait_for(lambda: value(scrape(port), "otel_disconnect_inflight_requests",
                                   'client="connected"') == 1)
            for pid in pids:  # workers this test's server started
                os.kill(pid, signal.SIGKILL)
            # uvicorn starts new workers; their scrape must not count the dead one's request.
            text = wait_for(lambda: (t := scrape(port)) and value(
                t, "otel_disconnect_inflight_requests", 'client="connected"') == 0 and t,
                timeout=60)
        assert value(text, "otel_disconnect_requests_total", 'method="GET",route="/hello"') == sent
