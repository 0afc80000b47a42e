"""DisconnectMiddleware: pure ASGI; wraps receive and send, detects, feeds the request state.

The middleware object holds configuration only; everything about one request lives in a
``_Cycle`` created per request.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable
from typing import Any

import anyio

from . import outcome
from ._types import ASGIApp, Message, Receive, Scope, Send
from .config import Config, options_from
from .context import reset_current, set_current
from .errors import ClientDisconnected, is_disconnect_error
from .failsafe import internal_error, logger
from .llm import instrument_upstreams
from .llm.response_tokens import BATCH_CHUNKS, Observer, observer_for
from .receive_pump import ReceivePump
from .retry import BodyDigest, RetryTracker, client_identity, fingerprint
from .routes import route_template
from .state import RequestState
from .telemetry import spans
from .telemetry.recorder import Recorder
from .telemetry.sinks import sink_for

_BODYLESS = frozenset(("GET", "HEAD", "DELETE", "OPTIONS"))


class DisconnectMiddleware:
    """Detect premature client disconnects and record them on the span and in Prometheus.

    ``app.add_middleware(DisconnectMiddleware, **options)``; options are listed in
    :class:`otel_disconnect.config.Config` and may also come from ``OTEL_DISCONNECT_*``.
    """

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        self.app = app
        self.config: Config = options_from(options)
        self.recorder = Recorder(self._sink())
        # Shared by this middleware's requests: digests of recently disconnected requests.
        self.retries = RetryTracker(self.config.retry_window_s)
        self.fleet: Any = None  # with redis_url: the fleet channel, started on the first request
        if self.config.redis_url is not None and self.retries.enabled:
            try:
                from .fleet.process import FleetRetries

                self.fleet = FleetRetries(
                    self.config.redis_url, self.config.fleet, self.retries, self.config.registry
                )
            except Exception:
                internal_error("fleet_start", self.config.registry)
        if self.config.count_tokens == "auto":
            try:
                instrument_upstreams()  # LLM gateways: count what they read from upstream
            except Exception:
                internal_error("instrument_upstreams", self.config.registry)

    def _sink(self) -> Any:
        """The metrics sink the options ask for; prometheus-client when the MeterProvider fails."""
        c = self.config
        try:
            return sink_for(c.metrics, c.registry, c.meter_provider)
        except Exception:
            internal_error("meter_provider", c.registry)
            return sink_for("prometheus", c.registry, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fleet is not None:
            # Background tasks on this loop, no I/O here; at lifespan start-up when the server
            # runs it, so a worker hears the fleet before its first request.
            try:
                self.fleet.ensure_started()
            except Exception:
                internal_error("fleet_start", self.config.registry)
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        try:
            path = scope.get("path", "")
            if type(path) is not str or type(scope.get("method", "GET")) is not str:
                # A scope this middleware cannot read is passed through unobserved.
                raise TypeError(f"unexpected scope: path {path!r}, method {scope.get('method')!r}")
            excluded = self.config.excluded_urls
            if excluded is not None and excluded.search(path):
                cycle = None
            else:
                cycle = _Cycle(self, scope, receive, send)
        except _NotAsyncio:
            _warn_not_asyncio()
            cycle = None
        except Exception:
            internal_error("request_start", self.config.registry)
            cycle = None
        if cycle is None:
            await self.app(scope, receive, send)
            return
        # _Cycle.run(), inlined: one coroutine fewer per request. All of the request's accounting
        # hangs on the one ``finally``: whatever raised inside otel-disconnect, or in the app,
        # cycle.ended() releases the in-flight gauges and the request's state.
        failure: str | None = None
        token = set_current(cycle.state)
        try:
            # The server's send a Python function: an error of its can be traced to it later
            # (send_failed), so body chunks go to it directly; else each send is awaited here.
            app_send = cycle.send if cycle.send_code is not None else cycle.send_awaited
            if self.config.cancel_on_disconnect is False:
                await self.app(scope, cycle.receive, app_send)
            else:
                # An anyio scope reaches the tasks Starlette streams in and respects the shields
                # of protect(); a cancellation it caught ends here as a normal return.
                with anyio.CancelScope() as cancel_scope:
                    cycle.state.arm_cancel(cancel_scope.cancel)
                    await self.app(scope, cycle.receive, app_send)
        except asyncio.CancelledError:
            failure = "cancelled"
            raise
        except BaseException as exc:
            failure = _failure_kind(exc)
            try:
                cycle.send_failed(exc)
            except Exception:
                internal_error("send", self.config.registry)
            raise
        finally:
            cycle.ended(failure)
            reset_current(token)


class _Cycle:
    """One request: the wrapped receive and send, the read-ahead, the state.

    The read-ahead (``ReceivePump``) is made on first need: when the app first calls
    ``receive()``, or when the request is still running on the loop's next turn. A request
    answered without ever yielding (most small JSON endpoints) never makes one.
    """

    __slots__ = (
        "app",
        "body_digest",
        "config",
        "pump",
        "receive_upstream",
        "recorder",
        "released",
        "remembered",
        "retries",
        "retry_checked",
        "scope",
        "send_code",
        "send_downstream",
        "state",
        "streaming",
        "token_batch",
        "tokens",
        "trailers",
        "watch_handle",
        "zombie",
    )

    def __init__(self, mw: DisconnectMiddleware, scope: Scope, receive: Receive, send: Send):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio (anyio's trio backend, Hypercorn's trio worker)
            raise _NotAsyncio from None
        self.app = mw.app
        self.config = mw.config
        self.recorder = mw.recorder
        self.retries = mw.retries
        self.retry_checked = False
        self.remembered = False
        self.body_digest: BodyDigest | None = None
        self.scope = scope
        self.receive_upstream = receive
        self.send_downstream = send
        self.send_code = getattr(getattr(send, "__func__", send), "__code__", None)
        self.trailers = False
        # The response started and no disconnect was detected: body chunks take send's fast path.
        self.streaming = False
        self.tokens: Observer | None = None  # an OpenAI-compatible response body's counter
        self.token_batch: list[bytes] | None = None  # its batch (see send), when it has one
        self.pump: ReceivePump | None = None
        self.watch_handle: asyncio.Handle | None = None
        self.zombie = False  # counted in the "disconnected" in-flight series
        self.released = False  # the request's bookkeeping is over (release() ran)
        state = self.state = RequestState(scope, spans.current_span())
        # The sink of this middleware, for whatever counts against the request from elsewhere
        # (token sources, engine callbacks, their internal errors), during it or after it.
        state.metrics = self.recorder.metrics
        if scope.get("method") in _BODYLESS or not _expects_continue(scope):
            # Reading ahead would make uvicorn answer "100 Continue" for an app that may still
            # reject the request unread; with that header, the app's first receive() goes first.
            # Started on the next turn of the loop: a request that completes without ever
            # yielding (a plain JSON endpoint) never needs it, and then costs nothing.
            # An empty context, not a copy of the request's: a copy holds the OpenTelemetry
            # context (the server span and all it references) until the loop drops the handle,
            # past the end of a short request, into the garbage collector's older generations.
            self.watch_handle = loop.call_soon(
                self.watch, context=contextvars.Context()
            )
        try:
            self.recorder.metrics.in_flight.arrived(state)
        except BaseException:
            # The request then passes through unobserved: nothing may read ahead of the app.
            if self.watch_handle is not None:
                self.watch_handle.cancel()
            raise

    # -- the app's receive and the read-ahead ----------------------------------------------------

    def receive(self) -> Awaitable[Message]:
        """The app's ``receive()``: a plain function returning the pump's coroutine, so the
        wrapper adds no coroutine of its own to each message."""
        pump = self.pump
        if pump is None:
            try:
                pump = self.new_pump()
            except Exception:
                internal_error("read_ahead", self.config.registry)
                return self.receive_observed()
        return pump.receive()

    async def receive_observed(self) -> Message:
        """The server's receive, watched but not read ahead (the read-ahead could not start)."""
        message = await self.receive_upstream()
        self.observe(message)
        return message

    def watch(self) -> None:
        """The loop's next turn after the request started: read ahead if it is still running."""
        self.watch_handle = None
        try:
            state = self.state
            if state.response_complete or state.ended:
                return
            (self.pump or self.new_pump()).watch()
        except Exception:
            # A callback of the event loop: nothing above us would count it.
            internal_error("read_ahead", self.config.registry)

    def new_pump(self) -> ReceivePump:
        pump = self.pump = ReceivePump(self.receive_upstream, self.observe, self.read_ahead_failed)
        if self.state.response_complete:
            pump.close()  # the app reads after its response: nothing left to watch for
        return pump

    def read_ahead_failed(self) -> None:
        internal_error("read_ahead", self.config.registry)

    # -- detection -----------------------------------------------------------------------------

    def observe(self, message: Message) -> None:
        """Every message read from the server, by the app or by the read-ahead, passes here.

        It never raises: the message is the server's, and reaches the app whatever fails here.
        """
        try:
            kind = message.get("type")
            if kind == "http.request":
                body = message.get("body")
                if body and self.retries.enabled:
                    if self.body_digest is None:
                        self.body_digest = BodyDigest()
                    self.body_digest.update(body)
                if not message.get("more_body", False):
                    self.state.body_complete = True
            elif kind == "http.disconnect":
                self.detect("receive")
        except Exception:
            internal_error("receive", self.config.registry)

    def detect(self, detected_by: str) -> None:
        """Mark a premature disconnect. Never raises; each step is isolated from the next."""
        state = self.state
        if self.released:
            return  # a read that finished after the request's end (its read-ahead failed to close)
        self.streaming = False  # every send from now on takes the slow path, which counts it
        try:
            if not state.mark_disconnected(detected_by):
                return
        except Exception:
            internal_error("detection", self.config.registry)
            return
        if self.token_batch:
            # The chunks held back were handed to the server before the client left: counted
            # as delivered now, before anything reads the account. Later ones come one by one.
            self.flush_tokens()
        self.token_batch = None
        try:
            self.recorder.metrics.in_flight.disconnected(state)
            self.zombie = True
        except Exception:
            internal_error("detection", self.config.registry)
        try:
            self.recorder.disconnect(state)
        except Exception:
            internal_error("disconnect", self.config.registry)
        if self.retries.enabled and state.body_complete:
            # Remember it now, not when it ends: its retry usually arrives while this request
            # still runs as a zombie. (It never matches itself: it began before its disconnect.)
            self.check_retry()
            self.remember_disconnect()
        if self.config.cancel_on_disconnect is not False:
            try:
                if self.config.wants_cancel(self.scope):
                    state.request_cancel()
            except Exception:
                internal_error("cancel", self.config.registry)

    # -- the app's send ------------------------------------------------------------------------

    def send(self, message: Message) -> Awaitable[None]:
        """The app's ``send()``: a plain function, like ``receive``. Every chunk of a streamed
        body sent while the client is there (the hot path of an LLM stream) goes straight to the
        server's send, whose awaitable is returned: not the final message (no retry check, no
        span to write), nothing dropped, no coroutine of ours per chunk. A token chunk of a
        templated stream is only kept in the observer's batch, counted later in one go (see
        flush_tokens): a list append here instead of a parser call per chunk. An ``OSError``
        the server raises for such a chunk (ASGI 2.4: the client left) reaches the app as it
        is, and the middleware detects it when it comes out of the app (``send_failed``)."""
        batch = self.token_batch  # a list only while streaming a templated event stream
        if batch is not None and message.get("more_body"):
            try:  # free in the common case, where .get() would be a method call per chunk
                batch.append(message["body"])
            except KeyError:  # a zero-copy send has no body: it counts nothing
                batch.append(b"")
            if len(batch) >= BATCH_CHUNKS:
                self.flush_tokens()
            # Loaded, then called: a method call on a slot holding a bound method is one the
            # interpreter cannot specialise, and it would look the name up on every chunk.
            send = self.send_downstream
            return send(message)
        if self.streaming and message.get("more_body"):
            # ``streaming``: the response started and the client is there. Only a body chunk
            # carries "more_body" (or a zero-copy send, whose missing body counts nothing).
            if self.tokens is not None:
                self.feed_tokens(message, False)
            send = self.send_downstream
            return send(message)
        return self.send_message(message)

    def send_failed(self, exc: BaseException) -> None:
        """The app raised ``exc``: an ``OSError`` that came out of the server's send on the hot
        path (ASGI 2.4: the client left), itself or as the cause of what the app raised instead
        (Starlette raises ``ClientDisconnect`` from it), is detected as the slow path detects it
        at once. An ``OSError`` of the app's own (a missing file) is no disconnect: only one
        whose traceback passes through the server's send counts."""
        state = self.state
        code = self.send_code
        if state.detected_perf is not None or state.response_complete or code is None:
            return
        error: BaseException | None = exc
        for _ in range(4):  # the exception and what it was raised from, a few levels
            if error is None:
                return
            if isinstance(error, OSError):
                tb = error.__traceback__
                while tb is not None:
                    if tb.tb_frame.f_code is code:
                        self.detect("send_error")
                        return
                    tb = tb.tb_next
            error = error.__cause__ or error.__context__

    async def send_awaited(self, message: Message) -> None:
        """The app's ``send()`` when the server's is not a Python function (Granian's): an error
        it raises cannot be traced to it afterwards, so every send is awaited here."""
        try:
            await self.send(message)
        except OSError:
            if not self.state.response_complete:
                self.detect("send_error")
            raise

    async def send_message(self, message: Message) -> None:
        """Every other message: the response start, the final body, trailers, and everything
        sent once the client is gone."""
        state = self.state
        final = False
        kind = message["type"]
        if kind == "http.response.body":
            final = not message.get("more_body", False) and not self.trailers
        elif kind == "http.response.start":
            state.response_started = True
            self.streaming = state.detected_perf is None
            self.trailers = bool(message.get("trailers", False))
            if self.config.count_tokens == "auto":
                try:
                    self.tokens = observer_for(state, message)
                except Exception:
                    internal_error("count_tokens", self.config.registry)
        elif kind == "http.response.trailers":
            final = not message.get("more_trailers", False)
        elif kind in ("http.response.pathsend", "http.response.zerocopysend"):
            final = not message.get("more_body", False)
        if final and self.retries.entries:  # someone disconnected lately: is this a retry?
            self.check_retry()  # before the final body: the server span ends with it
        if self.tokens is not None and kind == "http.response.body":
            self.feed_tokens(message, final)
        if final and state.extras and state.detected_perf is None:
            # Token counts of a normal request: the server span ends right after this message.
            self.write_span_now()
        if state.detected_perf is not None:
            self.count_dropped(message, final)
            if self.config.raise_on_send_after_disconnect:
                raise ClientDisconnected("client disconnected")
        try:
            await self.send_downstream(message)
        except OSError:
            # ASGI 2.4 servers raise OSError from send() once the client is gone.
            if not state.response_complete:
                self.detect("send_error")
            raise
        if final:
            state.response_complete = True
            if self.pump is not None:
                try:
                    self.pump.close()
                except Exception:
                    internal_error("send", self.config.registry)

    def feed_tokens(self, message: Message, final: bool) -> None:
        """OpenAI-compatible responses: tokens in chunks sent before detection were delivered.
        Each observer returns the one to keep; ordinary responses drop to None at once."""
        tokens = self.tokens
        if tokens is None:
            return
        state = self.state
        try:
            tokens = self.tokens = tokens.feed(
                state, message.get("body", b""), state.detected_perf is None, final
            )
            self.token_batch = None if tokens is None else tokens.batch
        except Exception:
            self.tokens = self.token_batch = None
            internal_error("count_tokens", self.config.registry)

    def flush_tokens(self) -> None:
        """Count the chunks the observer's batch holds (sent before any disconnect)."""
        tokens = self.tokens
        try:
            if tokens is not None and tokens.batch is not None:
                tokens.flush(self.state)
                self.token_batch = tokens.batch
        except Exception:
            self.tokens = self.token_batch = None
            internal_error("count_tokens", self.config.registry)

    def write_span_now(self) -> None:
        try:
            self.recorder.write_span(self.state, time.perf_counter())
        except Exception:
            internal_error("send", self.config.registry)

    def count_dropped(self, message: Message, final: bool) -> None:
        try:
            state = self.state
            state.sends_dropped += 1
            state.bytes_dropped += len(message.get("body") or b"")
            if message["type"] == "http.response.start":
                state.status = message.get("status")  # a 499 placeholder says "cancelled"
            if final:
                state.set_outcome(outcome.decide(state, None, final_sent=True))
                # The OpenTelemetry ASGI middleware ends the server span right after this
                # message: write the attributes now.
                self.recorder.write_span(state, time.perf_counter())
        except Exception:
            internal_error("send", self.config.registry)

    # -- retries -------------------------------------------------------------------------------

    def check_retry(self, again: bool = False) -> None:
        """Flag a request that repeats one whose client left within the retry window.
        ``again``: at the end, for a disconnect another process told us about meanwhile."""
        if self.state.retry_of_disconnected or (self.retry_checked and not again):
            return
        self.retry_checked = True
        try:
            route = route_template(self.scope)
            fp = self.fingerprint(route)
            # Only a disconnect seen before this request began can be the one it repeats.
            if self.retries.is_retry(fp, self.state.start_perf):
                self.state.retry_of_disconnected = True
                self.recorder.metrics.retries_after_disconnect.labels(route).inc()
                spans.set_attributes(self.state.span, {spans.RETRY_OF_DISCONNECTED: True})
        except Exception:
            internal_error("retry", self.config.registry)

    def remember_disconnect(self) -> None:
        if self.remembered:
            return
        self.remembered = True
        try:
            route = route_template(self.scope)
            at = self.state.detected_perf
            self.retries.disconnected(
                self.fingerprint(route),
                time.perf_counter() if at is None else at,
                self.state.start_perf,
            )
        except Exception:
            internal_error("retry", self.config.registry)

    def fingerprint(self, route: str) -> bytes:
        try:
            identity = client_identity(self.scope, self.config.retry_identity)
        except Exception:  # the app's hook failed: fall back to the client address
            internal_error("retry_identity", self.config.registry)
            identity = None
        return fingerprint(self.scope, route, self.body_digest, identity)

    # -- the end -------------------------------------------------------------------------------

    def ended(self, failure: str | None) -> None:
        """The app task ended: returned (None), was cancelled, or raised (see _failure_kind).

        Never raises. Whatever fails in the recording, ``release()`` runs: the in-flight gauges
        return to their true value and nothing keeps the request's state.
        """
        try:
            self.record_end(failure)
        except Exception:
            internal_error("request_end", self.config.registry)
        finally:
            self.release()

    def record_end(self, failure: str | None) -> None:
        state = self.state
        if self.token_batch:  # the app ended without its final body (raised, cancelled)
            self.flush_tokens()
        self.token_batch = None
        state.ended = True
        if (
            failure is None
            and state.detected_perf is None
            and state.response_complete
            and not state.extras
            and not self.retries.entries
        ):
            # The common case, kept to a few calls: nothing happened worth a span attribute.
            # (The read-ahead was closed when the final body was sent.)
            self.recorder.metrics.count_request(route_template(self.scope), state.method)
            return
        if self.pump is not None:
            self.pump.end()
        if failure == "cancelled" and not state.response_complete:
            # Cancelled by the server or framework with nothing else telling us why.
            self.detect("cancelled")
        if state.detected_perf is not None:
            state.set_outcome(outcome.decide(state, failure, state.response_complete))
        if self.retries.entries:
            self.check_retry(again=self.retries.publish is not None)
        if state.detected_perf is not None and self.retries.enabled:
            self.remember_disconnect()
        self.recorder.end(state)

    def release(self) -> None:
        """The end of the request's bookkeeping: runs once, whatever happened before it."""
        state = self.state
        state.ended = True
        self.released = True
        handle = self.watch_handle
        if handle is not None:
            # The scheduled watch holds this request (its span, scope, send) until the loop's
            # next turn; under concurrency that outlives a garbage-collector generation and
            # doubles the collections. Cancelling drops the reference now.
            self.watch_handle = None
            handle.cancel()
        try:
            in_flight = self.recorder.metrics.in_flight
            if self.zombie:
                in_flight.zombie_ended(state)
            else:
                in_flight.left(state)
        except Exception:  # multi-process gauges write to files; nothing else here can fail
            internal_error("request_end", self.config.registry)
        pump = self.pump
        if pump is not None:
            try:
                # Idempotent; usually closed when the final body was sent: ending it also
                # cancels a read still running in a Task (nobody will read it now).
                pump.end()
            except Exception:
                internal_error("request_end", self.config.registry)


class _NotAsyncio(Exception):
    """The request runs on an event loop other than asyncio's (trio)."""


_warned: set[str] = set()  # what this process has warned about once


def _warn_not_asyncio() -> None:
    """Once per process: the read-ahead and the request state are built on asyncio."""
    if "not_asyncio" not in _warned:
        _warned.add("not_asyncio")
        logger.warning(
            "otel-disconnect supports asyncio only; requests on this event loop (trio?) pass "
            "through unobserved"
        )


def _failure_kind(exc: BaseException) -> str:
    """A "client went away" exception ends the request as cancelled, not as an error."""
    return "disconnect_error" if is_disconnect_error(exc) else "error"


def _expects_continue(scope: Scope) -> bool:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"expect" and value.lower() == b"100-continue":
            return True
    return False
