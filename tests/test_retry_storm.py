"""A retry storm (README: Retry storms), scaled down in time, on a real server with real sockets.

An agreed concurrency of 4, a server that works up to its 0.9 s timeout, clients that time out
at a third of that (0.3 s) and retry the same request twice."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from .apps import Signals, build_app
from .conftest import Telemetry
from .servers import RawClient, serve, wait_for

CONCURRENCY = 4
SERVER_WORK_S = 0.9
CLIENT_TIMEOUT_S = SERVER_WORK_S / 3
ATTEMPTS = 3


def _impatient_client(port: int, client_id: int) -> None:
    body = f'{{"prompt": "client {client_id}"}}'.encode()
    for _ in range(ATTEMPTS):
        with RawClient(port) as client:
            client.request("POST", f"/generate?seconds={SERVER_WORK_S}", body=body)
            try:
                client.read_until(b'{"size":', timeout=CLIENT_TIMEOUT_S)
                return
            except (TimeoutError, AssertionError):
                continue  # timed out: hang up and retry


def _run_storm(telemetry: Telemetry, cancel: bool) -> dict[str, float]:
    app = build_app(Signals(), cancel_on_disconnect=cancel, **telemetry.options())
    peak = {"inflight": 0.0, "zombies": 0.0}
    stop = threading.Event()

    def watch() -> None:  # sample the in-process gauges while the storm runs
        while not stop.is_set():
            connected = telemetry.value("otel_disconnect_inflight_requests", client="connected")
            zombies = telemetry.value("otel_disconnect_inflight_requests", client="disconnected")
            peak["inflight"] = max(peak["inflight"], connected + zombies)
            peak["zombies"] = max(peak["zombies"], zombies)
            stop.wait(0.005)

    with serve(app, "uvicorn-httptools") as server:
        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda i: _impatient_client(server.port, i), range(CONCURRENCY)))
        wait_for(lambda: telemetry.value(
            "otel_disconnect_requests_total", route="/generate", method="POST")
            == CONCURRENCY * ATTEMPTS, timeout=30)
        stop.set()
        watcher.join()
    count = telemetry.value(
        "otel_disconnect_work_after_disconnect_seconds_count", route="/generate",
        outcome="cancelled" if cancel else "completed")
    within_50ms = telemetry.value(
        "otel_disconnect_work_after_disconnect_seconds_bucket", route="/generate",
        outcome="cancelled" if cancel else "completed", le="0.05")
    return {
        **peak,
        "retries": telemetry.value(
            "otel_disconnect_retries_after_disconnect_total", route="/generate"),
        "disconnects": count,
        "within_50ms": within_50ms,
    }


@pytest.mark.parametrize("cancel", [False, True], ids=["cancellation-off", "cancellation-on"])
def test_retry_storm(cancel: bool, telemetry: Telemetry) -> None:
    result = _run_storm(telemetry, cancel)
    assert result["disconnects"] == CONCURRENCY * ATTEMPTS, result
    assert result["retries"] == CONCURRENCY * (ATTEMPTS - 1), result
    if not cancel:
        # Every retry adds a zombie while the old request still holds its slot.
        assert result["inflight"] > CONCURRENCY, result
        assert result["zombies"] >= CONCURRENCY, result
        assert result["within_50ms"] == 0, result
    else:
        # Each zombie's work ends within 50 ms of its disconnect.
        assert result["within_50ms"] == result["disconnects"], result
