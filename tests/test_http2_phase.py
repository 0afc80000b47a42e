"""The phase of a disconnect on HTTP/2, where a request body needs no Content-Length (raw ASGI)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from otel_disconnect import current

from .test_protocol import FakeServer, middleware


@pytest.mark.parametrize(
    ("http_version", "method", "messages", "phase"),
    [
        # HTTP/2: a POST's body is framed by DATA frames; half of it came, then the reset.
        ("2", "POST", [{"type": "http.request", "body": b"{", "more_body": True}], "request_body"),
        # The whole body came (END_STREAM): waiting for the response.
        (
            "2",
            "POST",
            [{"type": "http.request", "body": b"{}", "more_body": False}],
            "before_response",
        ),
        (
            "2",
            "GET",
            [{"type": "http.request", "body": b"", "more_body": False}],
            "before_response",
        ),
        # HTTP/1.1 without Content-Length or Transfer-Encoding has no body.
        (
            "1.1",
            "POST",
            [{"type": "http.request", "body": b"", "more_body": False}],
            "before_response",
        ),
    ],
)
async def test_phase_without_content_length(
    http_version: str, method: str, messages: list[dict[str, Any]], phase: str
) -> None:
    server = FakeServer(messages)
    observed: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        state = current()
        assert state is not None
        await asyncio.sleep(0)  # the read-ahead takes what the server has
        server.queue.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(state.wait_disconnected(), 5)
        observed["phase"] = state.phase

    scope = {
        "type": "http",
        "method": method,
        "path": "/x",
        "headers": [],
        "http_version": http_version,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
    }
    await middleware(app)(scope, server.receive, server.send)
    assert observed["phase"] == phase
