"""Where the engine counts a request's tokens, neither the response body nor an upstream stream
is read: the counting a request pays for is the engine's alone."""

from __future__ import annotations

import httpx

from otel_disconnect.llm import httpx_upstream
from otel_disconnect.llm.account import ENGINE_KEY
from otel_disconnect.llm.response_tokens import observer_for
from otel_disconnect.state import RequestState

SSE_START = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]}


def _state(engine: bool) -> RequestState:
    state = RequestState({"type": "http", "method": "POST", "path": "/v1/chat/completions"})
    if engine:
        state.extra(ENGINE_KEY, object)
    return state


def test_the_response_body_is_not_observed_when_the_engine_counts() -> None:
    assert observer_for(_state(engine=False), SSE_START) is not None
    assert observer_for(_state(engine=True), SSE_START) is None


def test_an_upstream_stream_is_not_wrapped_when_the_engine_counts() -> None:
    request = httpx.Request("POST", "http://upstream/v1/chat/completions")

    def response() -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=httpx.ByteStream(b"data: [DONE]\n\n"), request=request)

    watched, skipped = response(), response()
    original = skipped.stream
    httpx_upstream._watch(httpx, _state(engine=False), request, watched, 0.0)
    httpx_upstream._watch(httpx, _state(engine=True), request, skipped, 0.0)
    assert isinstance(watched.stream, httpx_upstream.CountingStream)  # counted: wrapped
    assert skipped.stream is original
