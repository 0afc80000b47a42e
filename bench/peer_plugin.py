"""pytest plugin for bench/peer_suites.py: wrap every Starlette (and so FastAPI) app of a peer's
own test suite in DisconnectMiddleware, audit every HTTP request, and record each test's outcome.

Loaded with ``-p peer_plugin`` (``bench/`` on ``PYTHONPATH``). ``PEER_WRAP=1`` wraps every app
called through a test transport (``PEER_WRAP=starlette``: only Starlette apps, when their
middleware stack is built); without it the plugin only records outcomes (the baseline run).
``PEER_RESULTS`` names the JSON file written at the end:
``{"outcomes": {nodeid: outcome}, "audit": [violation, ...], "requests": n, ...}``.

The audit puts a recorder on each side of the middleware:

    server -> Outer -> DisconnectMiddleware -> Inner -> app

and checks, per request, that the messages the app received are the ones the server gave, in
order (a prefix of them: the read-ahead may have taken a message the app never asked for; and
``http.disconnect`` may be repeated to later calls, which is ASGI's rule), and that the server got
exactly the messages the app sent.
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
from typing import Any

import pytest

_record: contextvars.ContextVar[dict[str, list[Any]] | None] = contextvars.ContextVar(
    "peer_audit", default=None
)
_current_test = ["<collection>"]
_lock = threading.Lock()
_outcomes: dict[str, str] = {}
_violations: list[dict[str, Any]] = []
_requests = [0, 0]  # audited, of which on asyncio (on trio the middleware passes requests through)


def _on_asyncio() -> bool:
    import sniffio

    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def _short(messages: list[Any]) -> list[str]:
    return [repr(m)[:160] for m in messages[:12]]


def _check(record: dict[str, list[Any]]) -> str | None:
    given, got = record["server_gave"], record["app_got"]
    # http.disconnect is repeated to every later receive(): count it once.
    while len(got) >= 2 and got[-1] == got[-2] and got[-1].get("type") == "http.disconnect":
        got = got[:-1]
    if got != given[: len(got)]:
        return "the app's messages are not the server's, in order"
    if record["app_sent"] != record["server_got"]:
        return "the server did not get exactly what the app sent"
    return None


class Outer:
    """The server's side of the middleware."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record: dict[str, list[Any]] = {
            "server_gave": [],
            "server_got": [],
            "app_got": [],
            "app_sent": [],
        }
        token = _record.set(record)
        test = _current_test[0]
        on_asyncio = _on_asyncio()

        async def receive_from_server() -> Any:
            message = await receive()
            record["server_gave"].append(message)
            return message

        async def send_to_server(message: Any) -> None:
            record["server_got"].append(message)
            await send(message)

        try:
            await self.app(scope, receive_from_server, send_to_server)
        finally:
            _record.reset(token)
            problem = _check(record)
            with _lock:
                _requests[0] += 1
                _requests[1] += on_asyncio
                if problem is not None:
                    _violations.append(
                        {
                            "test": test,
                            "path": scope.get("path"),
                            "problem": problem,
                            **{k: _short(v) for k, v in record.items()},
                        }
                    )


class Inner:
    """The app's side of the middleware."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        record = _record.get()
        if scope["type"] != "http" or record is None:
            await self.app(scope, receive, send)
            return

        async def app_receive() -> Any:
            message = await receive()
            record["app_got"].append(message)
            return message

        async def app_send(message: Any) -> None:
            record["app_sent"].append(message)
            await send(message)

        await self.app(scope, app_receive, app_send)


def _wrapped(app: Any) -> Any:
    from prometheus_client import CollectorRegistry

    from otel_disconnect import DisconnectMiddleware

    # A registry per app: the suites build thousands of apps, each would otherwise register the
    # same metric names on the global registry.
    return Outer(DisconnectMiddleware(Inner(app), registry=CollectorRegistry()))


def _wrap_test_transports() -> None:
    """Every app a test calls through Starlette's TestClient or httpx's ASGITransport (FastAPI
    and Starlette apps, and the raw ASGI callables Starlette's suite tests), wrapped where the
    server would be: the test keeps its own app object (``client.app`` is unchanged)."""
    import httpx
    from starlette import testclient

    for cls in (testclient._TestClientTransport, httpx.ASGITransport):
        init = cls.__init__

        def __init__(self: Any, *args: Any, __init: Any = init, **kwargs: Any) -> None:
            __init(self, *args, **kwargs)
            self.app = _wrapped(self.app)

        cls.__init__ = __init__  # type: ignore[method-assign]


def _wrap_starlette() -> None:
    """``PEER_WRAP=starlette``: only Starlette/FastAPI apps, at ``build_middleware_stack``."""
    from starlette.applications import Starlette

    build = Starlette.build_middleware_stack

    def build_middleware_stack(self: Any) -> Any:
        return _wrapped(build(self))

    Starlette.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    mode = os.environ.get("PEER_WRAP")
    if mode == "1":
        _wrap_test_transports()
    elif mode == "starlette":
        _wrap_starlette()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    _current_test[0] = item.nodeid
    yield
    _current_test[0] = "<between tests>"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    if report.when == "call" or (report.when == "setup" and outcome != "passed"):
        _outcomes[report.nodeid] = outcome if report.when == "call" else f"setup-{outcome}"
    elif report.when == "teardown" and report.failed:
        _outcomes[report.nodeid] = "teardown-failed"


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _outcomes[f"{report.nodeid}::<collection>"] = "collection-error"


def pytest_unconfigure(config: pytest.Config) -> None:
    path = os.environ.get("PEER_RESULTS")
    if path:
        with open(path, "w") as out:
            json.dump(
                {
                    "outcomes": _outcomes,
                    "audit": _violations,
                    "requests": _requests[0],
                    "asyncio_requests": _requests[1],
                },
                out,
            )
