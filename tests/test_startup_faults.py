"""Start-up never fails because of telemetry; a bad option fails it clearly; odd scopes pass."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from otel_disconnect import DisconnectMiddleware, instrument_app
from otel_disconnect.config import metrics_path_from_env


class BrokenProvider(TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracer provider broken")


def _errors(registry: CollectorRegistry, where: str) -> float:
    return registry.get_sample_value("otel_disconnect_internal_errors_total", {"where": where}) or 0


def _hello_starlette() -> Starlette:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    return Starlette(routes=[Route("/hello", hello)])


@pytest.mark.parametrize("kind", ["fastapi", "starlette", "plain_asgi"])
def test_a_failing_tracer_provider_leaves_the_app_served(kind: str) -> None:
    registry = CollectorRegistry()
    app: Any
    if kind == "fastapi":
        app = FastAPI()

        @app.get("/hello")
        async def hello() -> PlainTextResponse:
            return PlainTextResponse("hello")

    elif kind == "starlette":
        app = _hello_starlette()
    else:

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"hello"})

    served = instrument_app(app, registry=registry, tracer_provider=BrokenProvider())
    response = TestClient(served).get("/hello")  # no lifespan: the plain app has none
    assert response.status_code == 200
    assert response.text == "hello"
    assert _errors(registry, "tracer_provider") >= 1
    # The middleware still counts the request (no span to write on).
    route = "unmatched" if kind == "plain_asgi" else "/hello"
    assert (
        registry.get_sample_value(
            "otel_disconnect_requests_total", {"route": route, "method": "GET"}
        )
        == 1
    )


def test_a_metric_name_already_taken_is_skipped_with_one_clear_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    # Another library holds two of our names, with other labels.
    Counter("otel_disconnect_requests", "someone else's", ["path"], registry=registry)
    Gauge("otel_disconnect_inflight_requests", "someone else's", registry=registry)
    app = _hello_starlette()
    with caplog.at_level(logging.ERROR, logger="otel_disconnect"):
        instrument_app(app, registry=registry)
        with TestClient(app) as client:
            assert client.get("/hello").text == "hello"
            exposition = client.get("/metrics").text
    taken = [r.getMessage() for r in caplog.records if "is not exported" in r.getMessage()]
    assert len(taken) == 2
    assert any("otel_disconnect_requests " in m for m in taken)
    assert any("otel_disconnect_inflight_requests " in m for m in taken)
    # The others work; the other library's series are untouched.
    assert _errors(registry, "metric_name_taken") == 2
    assert "otel_disconnect_client_disconnects_total" in exposition or (
        "# TYPE otel_disconnect_client_disconnects counter" in exposition
    )
    assert registry.get_sample_value("otel_disconnect_requests_total", {"path": "/hello"}) is None


def test_add_middleware_with_a_taken_name_serves_the_first_request() -> None:
    registry = CollectorRegistry()
    Counter("otel_disconnect_client_disconnects", "taken", registry=registry)
    app = _hello_starlette()
    app.add_middleware(DisconnectMiddleware, registry=registry)
    with TestClient(app) as client:
        assert client.get("/hello").text == "hello"
    assert (
        registry.get_sample_value(
            "otel_disconnect_requests_total", {"route": "/hello", "method": "GET"}
        )
        == 1
    )


BAD_OPTIONS = [
    ({"count_tokens": "sometimes"}, r"count_tokens='sometimes': expected one of auto, off"),
    ({"retry_window_s": -1.0}, r"retry_window_s=-1.0: expected seconds between 0"),
    ({"retry_window_s": float("nan")}, r"retry_window_s=nan"),
    ({"retry_window_s": float("inf")}, r"retry_window_s=inf"),
    ({"retry_window_s": "30"}, r"retry_window_s='30': expected a number of seconds"),
    ({"excluded_urls": "ok,(unclosed"}, r"excluded_urls: '\(unclosed' is not a valid regular"),
    ({"cancel_on_disconnect": "yes"}, r"cancel_on_disconnect='yes': expected True, False or"),
    ({"raise_on_send_after_disconnect": 1}, r"raise_on_send_after_disconnect=1: expected True"),
    ({"registry": object()}, r"registry=.*expected a prometheus_client CollectorRegistry"),
    ({"tracer_provider": 3}, r"tracer_provider=3: expected an OpenTelemetry TracerProvider"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_a_bad_option_names_itself(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DisconnectMiddleware(_hello_starlette(), **options)
    with pytest.raises(ValueError, match=message):
        instrument_app(_hello_starlette(), **options)


BAD_VARIABLES = [
    ("COUNT_TOKENS", "sometimes", r"OTEL_DISCONNECT_COUNT_TOKENS='sometimes': expected one of"),
    ("RETRY_WINDOW_S", "-1", r"OTEL_DISCONNECT_RETRY_WINDOW_S=-1.0: expected seconds between"),
    ("RETRY_WINDOW_S", "nan", r"OTEL_DISCONNECT_RETRY_WINDOW_S=nan"),
    ("RETRY_WINDOW_S", "soon", r"OTEL_DISCONNECT_RETRY_WINDOW_S='soon': expected a number"),
    ("EXCLUDED_URLS", "[", r"OTEL_DISCONNECT_EXCLUDED_URLS: '\[' is not a valid regular"),
    ("CANCEL_ON_DISCONNECT", "maybe", r"OTEL_DISCONNECT_CANCEL_ON_DISCONNECT='maybe': expected"),
]


@pytest.mark.parametrize(("variable", "value", "message"), BAD_VARIABLES)
def test_a_bad_variable_names_itself(
    variable: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_DISCONNECT_" + variable, value)
    with pytest.raises(ValueError, match=message):
        DisconnectMiddleware(_hello_starlette())


@pytest.mark.parametrize("path", ["metrics", "/has space", "http://x/metrics"])
def test_metrics_path_is_validated(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _hello_starlette()
    with pytest.raises(ValueError, match=r"metrics_path=.*expected a path starting with '/'"):
        instrument_app(app, metrics_path=path)
    assert not app.user_middleware  # nothing half-done
    monkeypatch.setenv("OTEL_DISCONNECT_METRICS_PATH", path)
    with pytest.raises(ValueError, match=r"OTEL_DISCONNECT_METRICS_PATH=.*expected a path"):
        metrics_path_from_env()


def test_metrics_path_empty_means_no_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_DISCONNECT_METRICS_PATH", "")
    assert metrics_path_from_env() is None
    monkeypatch.delenv("OTEL_DISCONNECT_METRICS_PATH")
    assert metrics_path_from_env() == "/metrics"


ODD_SCOPES: list[dict[str, Any]] = [
    {"path": None},
    {"path": b"/bytes"},
    {"path": 7},
    {"method": None},
    {"method": b"GET"},
    {"headers": [(b"content-length", 5)]},
    {"headers": [("expect", "100-continue")], "method": "POST"},
    {"headers": None},
    {"client": "not a tuple"},
]


@pytest.mark.parametrize("odd", ODD_SCOPES, ids=[repr(o) for o in ODD_SCOPES])
def test_an_odd_scope_passes_through(odd: dict[str, Any]) -> None:
    """Every scope field of an unexpected type: the app is called, the server sees no error."""
    registry = CollectorRegistry()
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = DisconnectMiddleware(app, registry=registry, excluded_urls="^/metrics$")
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "headers": [(b"host", b"x")],
        "client": ("127.0.0.1", 1),
        **odd,
    }
    sent: list[Any] = []
    messages = [{"type": "http.request", "body": b"hello", "more_body": False}]

    async def receive() -> Any:
        if messages:
            return messages.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    assert seen == [{"type": "http.request", "body": b"hello", "more_body": False}]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"ok"
    inflight = registry.get_sample_value(
        "otel_disconnect_inflight_requests", {"client": "connected"}
    )
    assert not inflight


def test_a_disconnect_with_an_odd_header_reaches_the_app() -> None:
    """Marking the disconnect fails (the phase reads a header that is not bytes): the app still
    gets ``http.disconnect`` from the read-ahead, and nothing hangs."""
    registry = CollectorRegistry()
    got: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.01)  # the read-ahead takes the disconnect meanwhile
        got.append(await receive())
        got.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    middleware = DisconnectMiddleware(app, registry=registry)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/x",
        "headers": [(b"content-length", 12345)],
        "client": ("127.0.0.1", 1),
    }

    async def main() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        queue.put_nowait({"type": "http.disconnect"})

        async def send(message: Any) -> None:
            return None

        await asyncio.wait_for(middleware(scope, queue.get, send), timeout=10)

    asyncio.run(main())
    assert got == [{"type": "http.disconnect"}, {"type": "http.disconnect"}]
    for client in ("connected", "disconnected"):
        assert not registry.get_sample_value(
            "otel_disconnect_inflight_requests", {"client": client}
        )
    assert _errors(registry, "detection") == 1
