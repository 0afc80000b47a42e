"""Detection latency: from the client closing its socket to otel-disconnect recording it.

One trial: a raw socket sends ``GET /wait?id=K`` (a handler that never calls ``receive()``), a
second keep-alive connection waits on ``/started?id=K`` until that handler runs, the client takes
``time.time()`` and closes the first socket, then ``/result?id=K`` returns
``current().disconnected_at`` (the server's ``time.time()`` at detection). Client and server are
processes on one machine, so the two clocks are the same clock.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

from loadgen import percentile
from procs import running

# Let the server settle between trials and before asking for the result, so the latency measured
# is the server noticing the close, not the server also parsing our next request.
SETTLE_S = 0.005


def _get(conn: http.client.HTTPConnection, path: str) -> Any:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {response.status} {body[:200]!r}")
    return json.loads(body)


def trial(port: int, control: http.client.HTTPConnection, key: str) -> float:
    """One disconnect; its detection latency in seconds."""
    client = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        client.sendall(f"GET /wait?id={key} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        _get(control, f"/started?id={key}")
        closed_at = time.time()
    finally:
        client.close()
    time.sleep(SETTLE_S)
    detected_at = _get(control, f"/result?id={key}")["disconnected_at"]
    if detected_at is None:
        raise RuntimeError(f"disconnect of trial {key} was not detected within the wait")
    return float(detected_at) - closed_at


def measure(kind: str, trials: int, pin: list[str] | None = None) -> dict[str, Any]:
    """Latencies (ms) of ``trials`` disconnects on one server running the otel+disconnect app."""
    with running("otel+disconnect", kind, pin) as server:
        control = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
        try:
            for i in range(min(3, trials)):  # warm-up: first-request imports and caches
                trial(server.port, control, f"warm{i}")
            latencies = [trial(server.port, control, str(i)) * 1e3 for i in range(trials)]
        finally:
            control.close()
    return {
        "server": kind,
        "trials": trials,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "min_ms": min(latencies),
    }
