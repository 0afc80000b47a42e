"""Disconnect detection on real servers with clients that really close their sockets."""

from __future__ import annotations

from typing import Any

import pytest

from .apps import Signals, build_app
from .conftest import Telemetry
from .servers import SERVERS, RawClient, advertises_asgi_24_without_raising, serve, wait_for

pytestmark = pytest.mark.matrix


def _span(telemetry: Telemetry, route: str) -> Any:
    def find() -> Any:
        for span in telemetry.server_spans():
            if span.attributes and span.attributes.get("http.route") == route:
                return span
        return None

    return wait_for(find)


def _disconnects(telemetry: Telemetry, route: str, method: str, phase: str, outcome: str) -> float:
    return telemetry.value(
        "otel_disconnect_client_disconnects_total",
        route=route,
        method=method,
        phase=phase,
        outcome=outcome,
    )


def _requests(telemetry: Telemetry, route: str, method: str = "GET") -> float:
    return telemetry.value("otel_disconnect_requests_total", route=route, method=method)


@pytest.fixture(params=SERVERS)
def server_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("base_http", [None, "inner", "outer"])
def test_get_that_never_reads_its_body(
    server_kind: str, base_http: str | None, telemetry: Telemetry
) -> None:
    signals = Signals()
    app = build_app(signals, base_http=base_http, **telemetry.options())
    with serve(app, server_kind) as server, RawClient(server.port) as client:
        client.request("GET", "/slow")
        signals.wait("slow.started")
        client.close()
        assert signals.wait("slow.saw_disconnect") is True  # current() is the dependency's state
        span = _span(telemetry, "/slow")
        wait_for(lambda: _requests(telemetry, "/slow") == 1)

    attrs = span.attributes
    assert attrs["disconnect.detected"] is True
    assert attrs["disconnect.phase"] == "before_response"
    assert attrs["disconnect.detected_by"] == "receive"
    assert attrs["disconnect.outcome"] == "completed"
    assert attrs["disconnect.work_after_s"] >= 0.045
    assert attrs["disconnect.offset_s"] > 0
    # response start and body (BaseHTTPMiddleware streams it: start, body, empty final body)
    assert attrs["disconnect.sends_dropped"] == (3 if base_http == "inner" else 2)
    assert attrs["disconnect.bytes_dropped"] == len(b'{"disconnected":true}')
    events = [e for e in span.events if e.name == "client.disconnect"]
    assert len(events) == 1
    assert events[0].attributes["disconnect.phase"] == "before_response"
    assert span.status.is_unset  # a client hang-up is not a server error
    assert _disconnects(telemetry, "/slow", "GET", "before_response", "completed") == 1
    assert telemetry.value("otel_disconnect_client_wait_seconds_count", route="/slow") == 1
    assert (
        telemetry.value(
            "otel_disconnect_work_after_disconnect_seconds_count",
            route="/slow",
            outcome="completed",
        )
        == 1
    )
    assert telemetry.value("otel_disconnect_inflight_requests", client="disconnected") == 0
    assert telemetry.value("otel_disconnect_inflight_requests", client="connected") == 0


def test_post_with_a_body_cut_short(server_kind: str, telemetry: Telemetry) -> None:
    signals = Signals()
    app = build_app(signals, **telemetry.options())
    with serve(app, server_kind) as server, RawClient(server.port) as client:
        client.request("POST", "/upload", headers={"Content-Length": "100000"}, send_body=False)
        client.send(b"x" * 1000)
        wait_for(lambda: (signals.values.get("upload.bytes") or 0) >= 1000)
        client.close()
        span = _span(telemetry, "/upload")
        wait_for(lambda: _requests(telemetry, "/upload", "POST") == 1)

    attrs = span.attributes
    assert attrs["disconnect.phase"] == "request_body"
    assert attrs["disconnect.detected_by"] == "receive"
    # Starlette raises ClientDisconnect out of request.stream(): the framework cut it short.
    assert attrs["disconnect.outcome"] == "cancelled"
    assert _disconnects(telemetry, "/upload", "POST", "request_body", "cancelled") == 1


def test_post_with_a_body_completes(server_kind: str, telemetry: Telemetry) -> None:
    signals = Signals()
    app = build_app(signals, **telemetry.options())
    body = bytes(range(256)) * 1024  # 256 KiB: larger than the read-ahead buffer
    with serve(app, server_kind) as server, RawClient(server.port) as client:
        client.request("POST", "/upload", body=body)
        client.read_until(b'{"size":262144}')
        wait_for(lambda: _requests(telemetry, "/upload", "POST") == 1)
    assert _span(telemetry, "/upload").attributes.get("disconnect.detected") is None


@pytest.mark.parametrize("base_http", [None, "inner"])
@pytest.mark.parametrize("path,counter", [("/stream", "stream.sent"), ("/sse", "sse.sent")])
def test_stream_abandoned_midway(
    server_kind: str, path: str, counter: str, base_http: str | None, telemetry: Telemetry
) -> None:
    signals = Signals()
    app = build_app(signals, base_http=base_http, **telemetry.options())
    with serve(app, server_kind) as server, RawClient(server.port) as client:
        client.request("GET", path)
        client.read_until(b"2\n" if path == "/stream" else b"event 2")
        client.close()
        span = _span(telemetry, path)
        wait_for(lambda: _requests(telemetry, path) == 1)
        sent = signals.values[counter]

    attrs = span.attributes
    assert attrs["disconnect.phase"] == "streaming"
    assert attrs["disconnect.detected_by"] in ("receive", "send_error")
    if path == "/stream" and advertises_asgi_24_without_raising(server_kind):
        # docs/detection.md: Starlette >= 0.42 trusts the 2.4 claim, runs no disconnect listener
        # and the stream runs to its end for nobody. Recorded as such;
        # raise_on_send_after_disconnect is the fix.
        assert attrs["disconnect.outcome"] == "completed"
        assert sent == 200
        assert attrs["disconnect.sends_dropped"] > 150
        assert _disconnects(telemetry, path, "GET", "streaming", "completed") == 1
    else:
        assert attrs["disconnect.outcome"] == "cancelled"
        assert sent < 200  # the stream was stopped, not run to the end
        assert _disconnects(telemetry, path, "GET", "streaming", "cancelled") == 1


def test_disconnect_after_response_is_not_counted(server_kind: str, telemetry: Telemetry) -> None:
    signals = Signals()
    app = build_app(signals, **telemetry.options())
    with serve(app, server_kind) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/items/42")
            client.read_until(b'{"item_id":42}')
        with RawClient(server.port) as client:
            client.request("GET", "/stream?chunks=3&interval=0")
            client.read_until(b"0\r\n\r\n")
        wait_for(lambda: _requests(telemetry, "/items/{item_id}") == 1)
        wait_for(lambda: _requests(telemetry, "/stream") == 1)
        spans = wait_for(lambda: len(telemetry.server_spans()) >= 2 and telemetry.server_spans())
    for span in spans:
        assert "disconnect.detected" not in span.attributes
    assert telemetry.value("otel_disconnect_client_disconnects_total") == 0
    samples = [
        s
        for m in telemetry.registry.collect()
        if m.name == "otel_disconnect_client_disconnects"
        for s in m.samples
    ]
    assert samples == []


def test_client_that_stays_records_nothing(server_kind: str, telemetry: Telemetry) -> None:
    signals = Signals()
    app = build_app(signals, **telemetry.options())
    with serve(app, server_kind) as server, RawClient(server.port) as client:
        client.request("GET", "/sleep?seconds=0.3")
        client.read_until(b'{"slept":0.3}')
        span = _span(telemetry, "/sleep")
        wait_for(lambda: _requests(telemetry, "/sleep") == 1)
    assert not [k for k in span.attributes if k.startswith("disconnect.")]
    assert not [e for e in span.events if e.name == "client.disconnect"]
    assert telemetry.value("otel_disconnect_inflight_requests", client="connected") == 0
