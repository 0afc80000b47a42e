"""Counting the OpenAI-compatible body the app itself sends (the middleware feeds it).

The middleware asks ``observer_for(state, message)`` at ``http.response.start``; for an
uncompressed ``text/event-stream`` or ``application/json`` response it gets an observer and
feeds it every ``http.response.body`` chunk with whether the chunk was handed to the server
before the client left (delivered). The token account is only created once a token or a
``usage`` object shows up, so ordinary JSON APIs keep the no-LLM path.
"""

from __future__ import annotations

from typing import Any

from .._types import Message
from ..state import RequestState
from .account import RESPONSE, Segment, TokenAccount, account_for
from .openai_stream import JSONUsageParser, SSEUsageParser

# A JSON body that does not contain this has no usage to count.
_USAGE_KEY = b'"completion_tokens"'


class ResponseObserver:
    __slots__ = ("_account", "_segment", "parser", "state")

    def __init__(self, state: RequestState, parser: SSEUsageParser | JSONUsageParser) -> None:
        self.state = state
        self.parser = parser
        self._account: TokenAccount | None = None
        self._segment: Segment | None = None

    def _open(self) -> tuple[TokenAccount, Segment]:
        if self._account is None or self._segment is None:
            self._account = account_for(self.state)
            self._segment = Segment(self.state.start_perf)
            self._account.tally(RESPONSE).add_segment(self._segment, self.state.detected_perf)
        return self._account, self._segment

    def feed(self, body: bytes, delivered: bool, final: bool) -> bool:
        """Count one body chunk; False once the rest of the body is not worth reading."""
        parser = self.parser
        if isinstance(parser, SSEUsageParser):
            n = parser.feed(body) if body else 0
            if n:
                account, segment = self._open()
                account.set_model(parser.model)
                account.counted(self.state, segment, n, delivered)
            if parser.usage_total is not None and (
                self._segment is None or self._segment.usage_total != parser.usage_total
            ):
                account, segment = self._open()
                account.set_model(parser.model)
                account.usage(self.state, segment, parser.usage_total)
            return not parser.foreign
        if final and not parser.buffered and body.find(_USAGE_KEY) < 0:
            # A whole JSON body in one chunk with no usage in it: an ordinary API response.
            # One scan in C instead of a parse keeps JSON APIs cheap.
            return False
        parser.feed(body)
        if final:
            total = parser.finish()
            if total is not None:
                account, segment = self._open()
                account.set_model(parser.model)
                account.usage(self.state, segment, total)
        return True


def observer_for(state: RequestState, message: Message) -> Any:
    """An observer for an OpenAI-compatible response, or None for anything else."""
    content_type = b""
    # Every response passes here. ASGI requires lower-case response header names, so they are
    # compared as they are; the common exact values skip parsing.
    for name, value in message.get("headers") or ():
        if name == b"content-type":
            content_type = value if value == b"application/json" else _media_type(value)
        elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return None  # compressed by an inner middleware: not worth decompressing to count
    if content_type == b"text/event-stream":
        return ResponseObserver(state, SSEUsageParser())
    if content_type == b"application/json":
        return JSON_PENDING
    return None


def _media_type(value: bytes) -> bytes:
    return value.split(b";", 1)[0].strip().lower()


class _PendingJSON:
    """A JSON response not looked at yet: most are ordinary API responses, and a body sent whole
    without ``completion_tokens`` in it needs no observer object at all."""

    __slots__ = ()


JSON_PENDING: Any = _PendingJSON()


def feed_tokens(
    observer: Any, state: RequestState, body: bytes, delivered: bool, final: bool
) -> ResponseObserver | None:
    """Feed one body chunk; returns the observer to keep (None when there is nothing to count)."""
    found: ResponseObserver
    if observer is JSON_PENDING:
        if final and body.find(_USAGE_KEY) < 0:
            return None
        found = ResponseObserver(state, JSONUsageParser())
    else:
        found = observer
    return found if found.feed(body, delivered, final) else None
