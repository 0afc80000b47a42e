"""Counting upstream OpenAI-compatible responses read with httpx inside a request (LLM gateways).

``instrument_httpx()`` wraps ``AsyncClient.send`` and ``Client.send`` of ``httpx`` and of
``httpx2`` (its successor, which the OpenAI SDK 3 uses; the SDK 1 and 2 use httpx). A response
to a ``.../completions`` URL with an SSE or JSON body, sent inside a request the middleware
sees, gets its byte stream wrapped: every token read counts
against that request, as after-disconnect once the downstream client left, and through the
metrics alone once the request ended. A stream still open when the request ended shows on the
span (``disconnect.llm.upstream_streams_open``) and keeps counting until it is closed.

Compressed upstream streams (``Content-Encoding``) are not counted; bodies httpx already read
(``stream=False``) are, after decoding.
"""

from __future__ import annotations

import importlib.util
import time
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..context import current_state
from ..failsafe import internal_error
from ..state import RequestState
from .account import ENGINE_KEY, UPSTREAM, Segment, TokenAccount, account_for
from .import_hooks import PatchOnImport
from .openai_stream import JSONUsageParser, SSEUsageParser

_MARK = "_otel_disconnect_original"


class Upstream:
    """One upstream response being read: its parser and its segment of the account."""

    __slots__ = ("_closed", "account", "parser", "segment", "state")

    def __init__(self, state: RequestState, parser: SSEUsageParser | JSONUsageParser,
                 started: float) -> None:
        self.state = state
        self.parser = parser
        self.account: TokenAccount = account_for(state)
        self.segment = Segment(started)
        self.account.tally(UPSTREAM).add_segment(self.segment, state.detected_perf)
        self.account.open_streams += 1
        self._closed = False

    def feed(self, chunk: bytes) -> None:
        try:
            parser = self.parser
            if isinstance(parser, JSONUsageParser):
                parser.feed(chunk)
                return
            n = parser.feed(chunk)
            if n:
                self.account.set_model(parser.model)
                self.segment.by_chunks = parser.by_chunks
                self.account.counted(self.state, self.segment, n, delivered=False)
            if parser.usage_total is not None and parser.usage_total != self.segment.usage_total:
                self.account.usage(self.state, self.segment, parser.usage_total)
        except Exception:
            internal_error("httpx_upstream")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            parser = self.parser
            if isinstance(parser, JSONUsageParser):
                total = parser.finish()
                if total is not None:
                    self.account.set_model(parser.model)
                    self.account.usage(self.state, self.segment, total)
            account = self.account
            account.open_streams -= 1
            account.tally(UPSTREAM).close(self.segment, self.state.detected_perf)
            account.upstream_closed(self.state)
        except Exception:
            internal_error("httpx_upstream")


class CountingStream:
    """Wraps an httpx byte stream (sync or async); passes every chunk through unchanged.

    Subclassed per module with that module's byte stream classes (``_stream_class``), which
    httpx checks with ``isinstance``.
    """

    def __init__(self, inner: Any, upstream: Upstream) -> None:
        self._inner = inner
        self._upstream = upstream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._upstream.feed(chunk)
                yield chunk
        finally:
            self._upstream.close()

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._upstream.feed(chunk)
                yield chunk
        finally:
            self._upstream.close()

    async def aclose(self) -> None:
        self._upstream.close()
        await self._inner.aclose()

    def close(self) -> None:
        self._upstream.close()
        self._inner.close()


def _parser_for(request: Any, response: Any) -> SSEUsageParser | JSONUsageParser | None:
    if not request.url.path.endswith("/completions"):
        return None
    content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "text/event-stream":
        return SSEUsageParser()
    if content_type == "application/json":
        return JSONUsageParser()
    return None


def _watch(mod: types.ModuleType, state: RequestState, request: Any, response: Any,
           started: float) -> None:
    if state.extras is not None and ENGINE_KEY in state.extras:
        return  # the engine counts this request's tokens exactly: the upstream is not read
    parser = _parser_for(request, response)
    if parser is None:
        return
    if hasattr(response, "_content"):  # already read and decoded (stream=False)
        upstream = Upstream(state, parser, started)
        upstream.feed(response.content)
        upstream.close()
        return
    if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
        return
    response.stream = _stream_class(mod)(response.stream, Upstream(state, parser, started))


_stream_classes: dict[str, type[CountingStream]] = {}


def _stream_class(mod: types.ModuleType) -> type[CountingStream]:
    found = _stream_classes.get(mod.__name__)
    if found is None:
        bases = (CountingStream, mod.AsyncByteStream, mod.SyncByteStream)
        found = _stream_classes[mod.__name__] = type("CountingStream", bases, {})
    return found


_CLIENTS = ("httpx", "httpx2")


def instrument_httpx() -> bool:
    """Patch httpx (and httpx2) once per process, now or when imported (never imported here);
    False when neither is installed."""
    installed = [name for name in _CLIENTS if importlib.util.find_spec(name) is not None]
    _hooks.enable(installed)
    return bool(installed)


def _patch(mod: types.ModuleType) -> None:
    if hasattr(mod.AsyncClient.send, _MARK):
        return
    original_async = mod.AsyncClient.send
    original_sync = mod.Client.send

    async def send_async(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        state = current_state()
        if state is None:
            return await original_async(self, request, *args, **kwargs)
        started = time.perf_counter()
        response = await original_async(self, request, *args, **kwargs)
        try:
            _watch(mod, state, request, response, started)
        except Exception:
            internal_error("httpx_upstream")
        return response

    def send_sync(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        state = current_state()
        if state is None:
            return original_sync(self, request, *args, **kwargs)
        started = time.perf_counter()
        response = original_sync(self, request, *args, **kwargs)
        try:
            _watch(mod, state, request, response, started)
        except Exception:
            internal_error("httpx_upstream")
        return response

    setattr(send_async, _MARK, original_async)
    setattr(send_sync, _MARK, original_sync)
    mod.AsyncClient.send = send_async
    mod.Client.send = send_sync


def uninstrument_httpx() -> None:
    with _hooks.lock:
        _hooks.disable()
        for mod in _hooks.imported():
            for cls in (mod.AsyncClient, mod.Client):
                original = getattr(cls.send, _MARK, None)
                if original is not None:
                    cls.send = original


_hooks = PatchOnImport(_CLIENTS, _patch, "httpx_upstream")
