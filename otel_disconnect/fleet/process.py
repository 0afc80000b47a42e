"""The app side: a middleware's retry tracker on the fleet channel, and this process's channel
for the database hooks' orphan events.

Retry events carry wall-clock times; the tracker keeps ``time.perf_counter()`` times, so a
received event is placed on this process's clock as "now minus how long ago it happened".
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from ..retry import RetryTracker
from ..telemetry.spans import trace_id_hex
from . import events
from .channel import FleetChannel

if TYPE_CHECKING:
    from ..db.engine import ConnState
    from ..state import RequestState

# A retry can reach another process before the process that lost the client has seen its
# disconnect: the client hangs up and reconnects at once, and the two processes race to run (on
# a loaded 2-core machine the loser was seen 20 to 500 ms late). A disconnect heard from the
# fleet counts as this much earlier, so such a retry is still after it; but never earlier than
# the disconnected request's own start, so that request, or an earlier attempt still running,
# is never taken for a retry of a later one. Only a request with the same fingerprint (key,
# identity or address, method, route, body) that began between the two could be flagged wrongly.
REMOTE_GRACE_S = 0.25

# One channel per (URL, fleet, registry) in a process, however many middlewares use it (the
# one instrument_app builds to check its options, several apps in one server, the
# instrumentor's rebuilt stacks): one reader, one writer, one origin, and one value for the
# channel-state gauge. The channel the database hooks publish on: the last one started.
_channels: dict[tuple[str, str, int], FleetChannel] = {}
_listeners: dict[FleetChannel, weakref.WeakSet[FleetRetries]] = {}
_current: list[FleetChannel] = []
_lock = threading.Lock()


def current() -> FleetChannel | None:
    return _current[-1] if _current else None


def shared_channel(url: str, fleet: str, registry: CollectorRegistry | None) -> FleetChannel:
    # The registry is kept alive by its channel, so its id is not reused while the key lives.
    key = (url, fleet, id(registry))
    with _lock:
        channel = _channels.get(key)
        if channel is None:
            listeners: weakref.WeakSet[FleetRetries] = weakref.WeakSet()

            def on_event(event: events.Event) -> None:
                for listener in list(listeners):
                    listener.on_event(event)

            channel = _channels[key] = FleetChannel(url, fleet, on_event, registry=registry)
            _listeners[channel] = listeners
        return channel


class FleetRetries:
    """Publishes this middleware's disconnects and feeds the fleet's into its local tracker."""

    def __init__(
        self, url: str, fleet: str, tracker: RetryTracker, registry: CollectorRegistry | None
    ) -> None:
        self.tracker = tracker
        self.channel = shared_channel(url, fleet, registry)
        with _lock:
            _listeners[self.channel].add(self)
        tracker.publish = self.publish

    def ensure_started(self) -> None:
        channel = self.channel
        channel.ensure_started()
        if not _current or _current[-1] is not channel:
            _current[:] = [channel]

    def publish(self, fp: bytes, at_perf: float, started_perf: float) -> None:
        channel = self.channel
        offset = time.time() - time.perf_counter()  # perf_counter -> wall clock
        channel.publish(
            events.retry(
                channel.fleet, channel.origin, fp, at_perf + offset, self.tracker.window_s,
                started=started_perf + offset,
            )
        )

    def on_event(self, event: events.Event) -> None:
        if event.kind == "r":
            at = event.t - REMOTE_GRACE_S
            if event.started is not None:
                at = max(at, event.started)
            offset = time.perf_counter() - time.time()  # wall clock -> perf_counter
            self.tracker.remember(event.fp, at + offset)


# -- database hooks ----------------------------------------------------------------------------


def claim(conn: ConnState, owner: str, state: RequestState | None) -> None:
    """``conn`` is held in a transaction by a request that ended or whose client left."""
    channel = current()
    if channel is None or conn.pid is None or conn.claimed == owner:
        return
    conn.claimed = owner
    span = state.span if state is not None else None
    channel.publish(
        events.orphan(
            channel.fleet,
            channel.origin,
            time.time(),
            db=conn.database,
            pid=conn.pid,
            owner=owner,
            trace_id=trace_id_hex(span),
            route=(state.route or "") if state is not None else "",
        )
    )


def release(conn: ConnState) -> None:
    """A claimed connection went back to its pool (or was closed)."""
    channel = current()
    if channel is None or conn.pid is None:
        return
    conn.claimed = None
    channel.publish(
        events.over(channel.fleet, channel.origin, time.time(), conn.database, conn.pid)
    )
