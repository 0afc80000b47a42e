"""Multi-process servers (PROMETHEUS_MULTIPROC_DIR): every worker's counts reach /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .multiproc_server import both_workers, scrape, value
from .servers import RawClient, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_two_workers_share_their_metrics(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.sample.instrumented_app:app", "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
        cwd=ROOT, env=env,
    )
    try:
        wait_for(lambda: scrape(port), timeout=60)
        _, sent = both_workers(port)
        with RawClient(port) as client:
            client.request("GET", "/slow")
            wait_for(lambda: value(scrape(port), "otel_disconnect_inflight_requests",
                                    'client="connected"') == 1)
        # The zombie's gauge is released after its counters are written (in the request's final
        # ``finally``): a scrape answered by the other worker can fall between the two.
        text = wait_for(lambda: (t := scrape(port)) and value(
            t, "otel_disconnect_client_disconnects_total",
            'method="GET",outcome="completed",phase="before_response",route="/slow"') == 1
            and value(t, "otel_disconnect_inflight_requests", 'client="disconnected"') == 0
            and t, timeout=15)
        assert value(text, "otel_disconnect_requests_total", 'method="GET",route="/hello"') == sent
        assert value(text, "otel_disconnect_inflight_requests", 'client="disconnected"') == 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_dead_workers_leave_the_in_flight_gauge(tmp_path: Path) -> None:
    """uvicorn never calls mark_process_dead: a worker killed with a request in flight must not
    hold the livesum gauge up for ever. Its counters still count."""
    from .multiproc_server import uvicorn_workers

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
