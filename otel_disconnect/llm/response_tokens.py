"""Counting the OpenAI-compatible body the app itself sends (the middleware feeds it).

The middleware asks ``observer_for(state, message)`` at ``http.response.start``; for an
uncompressed ``text/event-stream`` or ``application/json`` response it gets an observer and
feeds it every ``http.response.body`` chunk with whether the chunk was handed to the server
before the client left (delivered). The token account is only created once a token or a
``usage`` object shows up, so ordinary JSON APIs keep the no-LLM path.

Once an event stream's token chunks follow one template, its observer offers a ``batch``: the
middleware appends the chunks it sends before any disconnect to it (a list append per chunk,
nothing else) and the observer counts them together (``SSEUsageParser.feed_many``) when the
batch is full, when the next chunk needs the parser, at detection and at the end, so the
account is always up to date when something reads it.
"""

from __future__ import annotations

from typing import ClassVar

from .._types import Message
from ..state import RequestState
from .account import ENGINE_KEY, RESPONSE, Segment, TokenAccount, account_for
from .openai_stream import (
    COMPLETION_KEY,
    FOREIGN_EVENTS,
    JSONUsageParser,
    SSEUsageParser,
    foreign_event,
)

# Body chunks an observer's batch holds at most (by reference) before they are counted.
BATCH_CHUNKS = 64


class ResponseObserver:
    """Counts a JSON response body; ``feed()`` returns the observer to keep."""

    __slots__ = ("_account", "_segment", "parser", "state")
    batch: ClassVar[None] = None

    def __init__(self, state: RequestState, parser: JSONUsageParser) -> None:
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

    def feed(
        self, state: RequestState, body: bytes, delivered: bool, final: bool
    ) -> ResponseObserver | None:
        """Count one body chunk (``delivered``: handed to the server before the client left)."""
        parser = self.parser
        parser.feed(body)
        if final:
            total = parser.finish()
            if total is not None:
                account, segment = self._open()
                account.set_model(parser.model)
                account.usage(self.state, segment, total)
        return self


class SSEObserver:
    """Counts an event stream with ``SSEUsageParser``; ``feed()`` returns the observer to keep,
    or None once the rest of the stream is not worth reading. This runs for every chunk an LLM
    service streams: once the stream's chunks follow a template, a token chunk costs a list
    append in the middleware (``batch``) and its share of one ``flush()`` per batch."""

    __slots__ = ("_account", "_segment", "batch", "parser", "state")

    def __init__(self, state: RequestState, parser: SSEUsageParser) -> None:
        self.state = state
        self.parser = parser
        self._account: TokenAccount | None = None
        self._segment: Segment | None = None
        # Chunks sent before any disconnect, not counted yet; None while the parser must see
        # each chunk as it comes (no template yet, or an event split across chunks).
        self.batch: list[bytes] | None = None

    def flush(self, state: RequestState) -> None:
        """Count the batch: chunks handed to the server before the client left (delivered)."""
        batch = self.batch
        if batch:
            n = self.parser.feed_many(batch)
            batch.clear()
            self._took(state, n, True)
        self._batch_if_templated()

    def _batch_if_templated(self) -> None:
        if not self.parser.templated:
            self.batch = None
        elif self.batch is None:
            self.batch = []

    def _open(self) -> Segment:
        account = self._account = account_for(self.state)
        segment = self._segment = Segment(self.state.start_perf)
        account.tally(RESPONSE).add_segment(segment, self.state.detected_perf)
        account.set_model(self.parser.model)
        return segment

    def feed(
        self, state: RequestState, body: bytes, delivered: bool, final: bool
    ) -> SSEObserver | None:
        """Count one body chunk (``delivered``: handed to the server before the client left)."""
        if self.batch:
            self.flush(state)  # the chunks sent before this one first
        keep = self._took(state, self.parser.feed(body), delivered)
        if keep is not None and delivered and not final:
            self._batch_if_templated()
        else:
            self.batch = None
        return keep

    def _took(self, state: RequestState, n: int, delivered: bool) -> SSEObserver | None:
        """Count ``n`` tokens the parser just found, and its usage figure if it read one."""
        parser = self.parser
        if n:
            segment = self._segment or self._open()
            segment.by_chunks = parser.by_chunks
            if delivered and not state.ended:
                # Before any disconnect, on the event loop: nothing else writes this segment.
                segment.counted += n
                segment.delivered += n
            else:
                account = self._account
                assert account is not None
                account.counted(state, segment, n, delivered)
        usage = parser.usage_total  # a batch may end with the usage chunk after its tokens
        if usage is not None:
            segment = self._segment or self._open()
            if segment.usage_total != usage:
                account = self._account
                assert account is not None
                account.set_model(parser.model)
                account.usage(state, segment, usage)
        return None if parser.foreign else self


class _PendingSSE:
    """An event stream not known yet to be a completion stream. Until a chunk says so, whole
    events are screened in C (``foreign_event``) without a parser: a stream that opens with
    ``FOREIGN_EVENTS`` foreign data events (progress events, logs) is given up having cost a few
    searches per chunk; anything else hands over to a parser in the state the screened events
    would have left it in."""

    __slots__ = ("others",)
    batch: ClassVar[None] = None

    def __init__(self) -> None:
        self.others = 0

    def feed(
        self, state: RequestState, body: bytes, delivered: bool, final: bool
    ) -> SSEObserver | _PendingSSE | None:
        if not body:
            return self
        foreign = foreign_event(body)
        if foreign is None:
            parser = SSEUsageParser.after_foreign(self.others)
            return SSEObserver(state, parser).feed(state, body, delivered, final)
        if foreign:
            self.others += 1
            if self.others >= FOREIGN_EVENTS:
                return None
        return self


class _PendingJSON:
    """A JSON response not looked at yet: most are ordinary API responses, and a body sent whole
    without ``completion_tokens`` in it needs no observer object at all (one search in C)."""

    __slots__ = ()
    batch: ClassVar[None] = None

    def feed(
        self, state: RequestState, body: bytes, delivered: bool, final: bool
    ) -> ResponseObserver | None:
        if final and body.find(COMPLETION_KEY) < 0:
            return None
        return ResponseObserver(state, JSONUsageParser()).feed(state, body, delivered, final)


JSON_PENDING = _PendingJSON()

# What the middleware keeps per response: ``observer.feed(...)`` returns the next one.
Observer = ResponseObserver | SSEObserver | _PendingSSE | _PendingJSON


def observer_for(state: RequestState, message: Message) -> Observer | None:
    """An observer for an OpenAI-compatible response, or None for anything else."""
    if state.extras is not None and ENGINE_KEY in state.extras:
        return None  # the engine counts this request's tokens exactly: the body is not read
    content_type = b""
    # Every response passes here. ASGI requires lower-case response header names, so they are
    # compared as they are; the common exact values skip parsing.
    for name, value in message.get("headers") or ():
        if name == b"content-type":
            content_type = _COMMON_TYPES.get(value) or _media_type(value)
        elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return None  # compressed by an inner middleware: not worth decompressing to count
    if content_type == b"text/event-stream":
        return _PendingSSE()
    if content_type == b"application/json":
        return JSON_PENDING
    return None


# Content-Type values as frameworks write them (Starlette adds the charset to text/ types).
_COMMON_TYPES = {
    b"application/json": b"application/json",
    b"text/event-stream": b"text/event-stream",
    b"text/event-stream; charset=utf-8": b"text/event-stream",
}


def _media_type(value: bytes) -> bytes:
    return value.split(b";", 1)[0].strip().lower()
