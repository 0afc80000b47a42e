"""One client hang-up through a real proxy to a real uvicorn, and what the app saw of it.

``run_case(upstream, proxy, point)`` makes one request through the proxy, hangs up at ``point``
(``request_body``, ``before_response`` or ``streaming``), and returns what the package recorded:
detected or not, the phase, the outcome, and the delay from the client's close to the package's
detection (the time of the span's disconnect event). ``EXPECTED`` is what the README's
table claims for every proxy, setting and point; tests/test_proxies.py asserts it and
bench/proxies.py measures the delays over many trials.

The app runs with ``cancel_on_disconnect=True``, so a detected disconnect ends the request at
once and an undetected one runs to its end: a short, bounded test either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from otel_disconnect.telemetry.spans import EVENT_CLIENT_DISCONNECT
from tests.apps import Signals
from tests.proxies import Proxy
from tests.servers import RawClient, ServerThread, wait_for

POINTS = ("request_body", "before_response", "streaming")

# The app's work when nobody stops it: /work sleeps this long, /stream sends this many chunks.
WORK_S = 1.5
STREAM_CHUNKS, STREAM_INTERVAL_S = 100, 0.015
# "Promptly", as an order of events rather than a clock: a detected mid-stream hang-up stops
# the stream within this many of the app's chunks after the close (measured: 0 to 4).
STREAM_STEPS_BOUND = 10


@dataclass(frozen=True)
class Expect:
    detected: bool
    # Why not, and what to change (the README's last column); "" where it is detected.
    advice: str = ""
    # The request never reached the app (a proxy that buffers the whole request body first).
    reaches_app: bool = True


_BUFFERED_BODY = Expect(
    False,
    "nginx reads the whole request body before it connects upstream "
    "(proxy_request_buffering on): the app never sees an abandoned upload",
    reaches_app=False,
)
_IGNORE = Expect(
    False, "proxy_ignore_client_abort on: nginx keeps the upstream request running; set it off"
)

_HAPROXY_WAITS = Expect(
    False,
    "HAProxy takes the client's close for a half-close and waits for the server's "
    "response; the app hears of it at its first response bytes (option abortonclose passes "
    "it on for a request whose body came after its head)",
)
_CADDY_FLUSH = Expect(
    False,
    "flush_interval -1 makes Caddy ignore a client gone until it next writes to it; "
    "Caddy flushes text/event-stream at once without it: remove flush_interval -1",
)

DETECTED = Expect(True)

EXPECTED: dict[tuple[str, str], dict[str, Expect]] = {
    ("nginx", "default"): {
        "request_body": _BUFFERED_BODY,
        "before_response": DETECTED,
        "streaming": DETECTED,
    },
    ("nginx", "streaming"): {
        "request_body": DETECTED,
        "before_response": DETECTED,
        "streaming": DETECTED,
    },
    ("nginx", "ignore_client_abort"): {
        "request_body": DETECTED,
        "before_response": _IGNORE,
        "streaming": DETECTED,
    },
    **{
        ("haproxy", setting): {
            "request_body": DETECTED,
            "before_response": _HAPROXY_WAITS,
            "streaming": DETECTED,
        }
        for setting in ("default", "http-server-close", "abortonclose")
    },
    ("caddy", "default"): {p: DETECTED for p in POINTS},
    ("caddy", "flush"): {
        "request_body": DETECTED,
        "before_response": _CADDY_FLUSH,
        "streaming": DETECTED,
    },
}


# What ``otel-disconnect probe`` sees. Its before-response request is a POST whose body follows
# its head, as HTTP clients write one, where the table's cell is a GET; HAProxy's
# option abortonclose passes the hang-up on for the first and not for the second
# (tests/test_proxies.py, test_haproxy_abortonclose_passes_on_...).
PROBE_EXPECTED: dict[tuple[str, str], dict[str, Expect]] = {
    **EXPECTED,
    ("haproxy", "abortonclose"): {p: DETECTED for p in POINTS},
}


@dataclass
class Upstream:
    server: ServerThread
    signals: Signals
    telemetry: Any  # tests.conftest.Telemetry


@dataclass
class Observation:
    reached_app: bool
    detected: bool
    phase: str | None = None
    outcome: str | None = None
    detected_by: str | None = None
    delay_s: float | None = None  # client close -> detection
    app_steps_after_close: int | None = None  # stream chunks the app made after the close


def _route_span(telemetry: Any, route: str) -> Any:
    for span in telemetry.server_spans():
        if span.attributes and span.attributes.get("http.route") == route:
            return span
    return None


def _observe(up: Upstream, route: str, closed_at: float, timeout: float) -> Observation:
    span = wait_for(lambda: _route_span(up.telemetry, route), timeout=timeout)
    attrs = dict(span.attributes)
    if not attrs.get("disconnect.detected"):
        return Observation(True, False)
    # The disconnect event carries the wall-clock time of detection. The span's start plus
    # disconnect.offset_s would not: the offset counts from the package's own start of the
    # request, which on a busy machine comes milliseconds after the outer server span began.
    event = next(e for e in span.events if e.name == EVENT_CLIENT_DISCONNECT)
    detected_at = event.timestamp / 1e9
    return Observation(
        True,
        True,
        attrs["disconnect.phase"],
        attrs["disconnect.outcome"],
        attrs["disconnect.detected_by"],
        detected_at - closed_at,
    )


def _logged_aborts(proxy: Proxy) -> int:
    log = proxy.workdir / "proxy.log"
    return log.read_text(errors="replace").count("prematurely closed") if log.exists() else 0


def _reset(up: Upstream) -> None:
    up.signals.events.clear()
    up.signals.values.clear()
    up.telemetry.exporter.clear()


def run_case(up: Upstream, proxy: Proxy, point: str, expect: Expect | None = None) -> Observation:
    _reset(up)
    timeout = WORK_S + STREAM_CHUNKS * STREAM_INTERVAL_S + 10
    if point == "request_body":
        with RawClient(proxy.port) as client:
            client.request("POST", "/upload", headers={"Content-Length": "100000"}, send_body=False)
            client.send(b"x" * 1000)
            if expect is not None and not expect.reaches_app:
                # The proxy holds the body and nothing reaches the app: close, and wait until
                # the proxy logged this client's abort (one more line than before).
                aborts = _logged_aborts(proxy)
                client.close()
                wait_for(lambda: _logged_aborts(proxy) > aborts, timeout=10)
                return Observation(
                    reached_app="upload.started" in up.signals.values, detected=False
                )
            wait_for(lambda: (up.signals.values.get("upload.bytes") or 0) >= 1000, timeout=10)
            closed_at = time.time()
        return _observe(up, "/upload", closed_at, timeout)
    if point == "before_response":
        with RawClient(proxy.port) as client:
            client.request("GET", f"/work?seconds={WORK_S}")
            up.signals.wait("work.started")
            closed_at = time.time()
        return _observe(up, "/work", closed_at, timeout)
    if point == "streaming":
        with RawClient(proxy.port) as client:
            client.request("GET", f"/stream?chunks={STREAM_CHUNKS}&interval={STREAM_INTERVAL_S}")
            wait_for(lambda: (up.signals.values.get("stream.sent") or 0) >= 5, timeout=10)
            sent_at_close = up.signals.values["stream.sent"]
            closed_at = time.time()
        observation = _observe(up, "/stream", closed_at, timeout)
        observation.app_steps_after_close = up.signals.values["stream.sent"] - sent_at_close
        return observation
    raise ValueError(point)
