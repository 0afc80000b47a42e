"""The request model: ``RequestState``, the one mutable record of a request, which the
middleware owns; ``RequestView``, the app's read-only view of it; and ``Extension``, how token
sources and database hooks hang their per-request accounting on it.

The record travels in a ContextVar (``otel_disconnect.context``); the recorder reads it at the
end. Nothing here imports the middleware or the sinks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ._types import Scope

PHASE_REQUEST_BODY = "request_body"
PHASE_BEFORE_RESPONSE = "before_response"
PHASE_STREAMING = "streaming"

# Reasons in RequestState.work_stopped.
STOPPED_APP_SAW_DISCONNECT = "app_saw_disconnect"
STOPPED_ENGINE_ABORT = "engine_abort"
STOPPED_UPSTREAM_CLOSED = "upstream_closed"


class Extension:
    """Per-request accounting of an integration (a token source, the database hooks), stored
    with ``state.extra(key, factory)``; the recorder calls these hooks, and only these."""

    __slots__ = ()

    def on_disconnect(self, state: RequestState) -> None:
        """The client left (once per request, when the disconnect is recorded)."""

    def span_attributes(self, state: RequestState) -> dict[str, Any]:
        """Attributes for the server span, written once before it ends."""
        return {}

    def record_end(self, state: RequestState, metrics: Any, route: str) -> None:
        """The request ended: count into ``metrics`` (the request's sink)."""

    def work_running(self, state: RequestState) -> bool:
        """This integration's work for the request is still running (the outcome rule asks it
        when the app sends its final body after the disconnect)."""
        return False


class RequestState:
    """What one HTTP request has done so far: the middleware's record. Apps read it through a
    ``RequestView`` (``current()``, ``client_state``), never write it."""

    __slots__ = (
        "_cancel",
        "_cancel_deferred",
        "_detected_by",
        "_disconnected_at",
        "_event",
        "_outcome",
        "_phase_at_disconnect",
        "_protected",
        "_view",
        "body_complete",
        "bytes_dropped",
        "detected_perf",
        "ended",
        "extras",
        "method",
        "metrics",
        "protected_section",
        "response_complete",
        "response_started",
        "retry_of_disconnected",
        "route",
        "scope",
        "sends_dropped",
        "span",
        "span_written",
        "start_perf",
        "status",
        "stream_end",
        "work_stopped",
    )

    def __init__(self, scope: Scope, span: Any = None) -> None:
        self.scope = scope
        self.span = span
        self.span_written = False
        self.method: str = scope.get("method", "GET")
        self.route: str | None = None
        self.start_perf = time.perf_counter()
        self.body_complete = False
        self.response_started = False
        self.response_complete = False
        self.ended = False
        self.detected_perf: float | None = None
        self.sends_dropped = 0
        self.bytes_dropped = 0
        self.protected_section: str | None = None
        self.stream_end: str | None = None
        self.retry_of_disconnected = False
        # The status of a response started after the disconnect (the outcome rule reads it).
        self.status: int | None = None
        # Why the request's work is known to have stopped early (see otel_disconnect.outcome).
        self.work_stopped: str | None = None
        # Token and database accounting hang their per-request objects here, keyed by module.
        self.extras: dict[str, Extension] | None = None
        # The Metrics of the middleware that saw this request, for counts from token sources and
        # engine callbacks, during the request or after it ended (a producer task's tokens).
        self.metrics: Any = None
        self._disconnected_at: float | None = None
        self._detected_by: str | None = None
        self._outcome: str | None = None
        self._phase_at_disconnect: str | None = None
        self._event: asyncio.Event | None = None
        self._protected: list[str] | None = None
        self._cancel: Callable[[], None] | None = None
        self._cancel_deferred = False
        self._view: RequestView | None = None

    def view(self) -> RequestView:
        """The app's read-only view of this request (one per request)."""
        view = self._view
        if view is None:
            view = self._view = RequestView(self)
        return view

    # -- read by apps ---------------------------------------------------------------------------

    @property
    def disconnected(self) -> bool:
        """True once the client left before the final response body was sent.

        An app that reads True here before it starts its response has seen the disconnect:
        whatever it sends next is taken as its reaction to it (outcome ``cancelled``). A stream
        that reads it and goes on (to count what it sends for nobody, say) is judged by what it
        sends. The package's own code reads ``detected_perf`` instead, so that only the app's
        look counts.
        """
        if self._disconnected_at is None:
            return False
        if self.work_stopped is None and not self.response_started:
            self.work_stopped = STOPPED_APP_SAW_DISCONNECT
        return True

    @property
    def disconnected_at(self) -> float | None:
        """Wall-clock time (``time.time()``) of detection, or None."""
        return self._disconnected_at

    @property
    def phase(self) -> str:
        """The request's phase now, or the phase it was in when the client left."""
        if self._phase_at_disconnect is not None:
            return self._phase_at_disconnect
        if self.response_started:
            return PHASE_STREAMING
        if not self.body_complete and _declares_body(self.scope):
            return PHASE_REQUEST_BODY
        return PHASE_BEFORE_RESPONSE

    @property
    def detected_by(self) -> str | None:
        return self._detected_by

    @property
    def outcome(self) -> str | None:
        return self._outcome

    @property
    def offset_s(self) -> float | None:
        """Request start to detection, in seconds."""
        if self.detected_perf is None:
            return None
        return self.detected_perf - self.start_perf

    async def wait_disconnected(self) -> None:
        """Return when the client disconnects prematurely (never, if it does not)."""
        if self._disconnected_at is not None:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    def __repr__(self) -> str:
        gone = self._disconnected_at is not None  # not the property: reading it marks "seen"
        return (
            f"<RequestState {self.method} route={self.route!r} disconnected={gone}"
            f" phase={self.phase!r} detected_by={self._detected_by!r} outcome={self._outcome!r}>"
        )

    # -- written by the middleware and integrations -----------------------------------------

    def mark_disconnected(self, detected_by: str) -> bool:
        """Record a premature disconnect once; False if it was already recorded or not premature."""
        if self._disconnected_at is not None or self.response_complete:
            return False
        self._phase_at_disconnect = self.phase
        if self._protected:
            self.protected_section = self._protected[-1]
        self.detected_perf = time.perf_counter()
        self._disconnected_at = time.time()
        self._detected_by = detected_by
        if self._event is not None:
            self._event.set()
        return True

    # -- cancellation (cancel_on_disconnect, protect()) -----------------------------------------

    def arm_cancel(self, cancel: Callable[[], None]) -> None:
        """The middleware hands over how to cancel this request's work."""
        self._cancel = cancel

    def request_cancel(self) -> None:
        """Cancel now, or when the outermost ``protect()`` block exits."""
        if self._cancel is None:
            return
        if self._protected:
            self._cancel_deferred = True
        else:
            self._cancel()

    def enter_protected(self, name: str) -> None:
        if self._protected is None:
            self._protected = []
        self._protected.append(name)

    def exit_protected(self) -> bool:
        """Leave a protect() block; True when a deferred cancellation was released."""
        if self._protected:
            self._protected.pop()
        if not self._protected and self._cancel_deferred and self._cancel is not None:
            self._cancel_deferred = False
            self._cancel()
            return True
        return False

    def set_outcome(self, outcome: str) -> None:
        if self._outcome is None:
            self._outcome = outcome

    def note_work_stopped(self, why: str) -> None:
        """A token source or hook saw this request's work stop early (engine abort, upstream
        stream closed before its end); the first reason is kept."""
        if self.work_stopped is None:
            self.work_stopped = why

    def extra(self, key: str, factory: Callable[[], Extension]) -> Any:
        """The integration object stored under ``key``, created by ``factory`` on first use."""
        if self.extras is None:
            self.extras = {}
        found = self.extras.get(key)
        if found is None:
            found = self.extras[key] = factory()
        return found


_BODYLESS_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE"))


def _declares_body(scope: Scope) -> bool:
    """Whether the request has a body still to arrive (a GET usually has none to wait for)."""
    for name, value in scope.get("headers") or ():
        lname = name.lower()
        if lname == b"transfer-encoding":
            return True
        if lname == b"content-length":
            return value.strip() not in (b"0", b"")
    # HTTP/2 and HTTP/3 frame a body without either header (Content-Length is optional there
    # and Transfer-Encoding is forbidden): a POST's body is pending until the server says so.
    return scope.get("http_version") in ("2", "3") and scope.get("method") not in _BODYLESS_METHODS


class RequestView:
    """The app's read-only view of its request: what ``current()`` and ``client_state`` give.

    Reading ``disconnected`` as True before the response started tells the package the app saw
    the disconnect (the outcome rule: docs/outcome.md); nothing else an app does through the view
    changes the request's record.
    """

    __slots__ = ("_state",)

    def __init__(self, state: RequestState) -> None:
        self._state = state

    @property
    def disconnected(self) -> bool:
        """True once the client left before the final response body was sent."""
        return self._state.disconnected

    @property
    def disconnected_at(self) -> float | None:
        """Wall-clock time (``time.time()``) of detection, or None."""
        return self._state.disconnected_at

    @property
    def phase(self) -> str:
        """``request_body``, ``before_response`` or ``streaming``: now, or when the client left."""
        return self._state.phase

    @property
    def detected_by(self) -> str | None:
        """``receive``, ``send_error`` or ``cancelled``, or None while the client is there."""
        return self._state.detected_by

    @property
    def outcome(self) -> str | None:
        """``cancelled``, ``completed`` or ``error`` once the request ended after a disconnect."""
        return self._state.outcome

    @property
    def offset_s(self) -> float | None:
        """Request start to detection, in seconds."""
        return self._state.offset_s

    @property
    def method(self) -> str:
        return self._state.method

    async def wait_disconnected(self) -> None:
        """Return when the client disconnects prematurely (never, if it does not)."""
        await self._state.wait_disconnected()

    def __repr__(self) -> str:
        return repr(self._state)
