"""``FleetChannel``: one process's writer and reader of its fleet's Redis stream.

Nothing here runs on a request's path. ``publish()`` appends to a bounded queue (any thread, no
I/O; a full queue drops the event and counts it) and wakes a background writer task, which sends
what is queued in one pipeline of ``XADD ... MAXLEN ~``. A background reader task blocks in
``XREAD`` and hands every event of another process of the same fleet to ``on_event``. Either task
that loses Redis (down, slow, restarted, wrong URL) counts an internal error, sets
``otel_disconnect_fleet_channel_up`` to 0, and reconnects with capped exponential backoff; the
process meanwhile detects on its own. A Redis stream rather than Pub/Sub, so that a reader that
starts late (the pg-exporter) can read the events still kept (``from_start=True``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import socket
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from ..failsafe import internal_error
from . import events
from .metrics import fleet_metrics

KEY_PREFIX = "otel-disconnect:"
QUEUE_MAX = 10_000  # events waiting for Redis, per process
STREAM_MAXLEN = 10_000  # events Redis keeps per fleet (trimmed approximately, in whole nodes)
BATCH = 500
BLOCK_MS = 5_000  # an idle reader sends one XREAD per this long
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 2.0
TIMEOUT_S = 2.0


def stream_key(fleet: str) -> str:
    return f"{KEY_PREFIX}{fleet}:events"


class FleetChannel:
    def __init__(
        self,
        url: str,
        fleet: str,
        on_event: Callable[[events.Event], None],
        *,
        registry: CollectorRegistry | None = None,
        write: bool = True,
        from_start: bool = False,
        queue_max: int | None = None,
        block_ms: int = BLOCK_MS,
    ) -> None:
        self.url = url
        self.fleet = fleet
        self.key = stream_key(fleet)
        self.on_event = on_event
        self.registry = registry
        self.metrics = fleet_metrics(registry)
        self.write = write
        self.from_start = from_start
        self.queue_max = QUEUE_MAX if queue_max is None else queue_max
        self.block_ms = block_ms
        self.origin = ""
        self.queue: collections.deque[bytes] = collections.deque()
        self.sending = 0  # events taken off the queue for the pipeline now on its way
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.closing = False
        self._wake: asyncio.Event | None = None
        self._thread = 0
        self._read_ok = False
        self._write_ok = True
        self.metrics.up.set(0)

    # -- life ----------------------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the tasks on the running loop, once per loop (a process may run several loops
        one after another: tests, ``asyncio.run`` in a CLI)."""
        loop = asyncio.get_running_loop()
        old = self.loop
        if old is loop:
            return
        if old is not None and old.is_running() and any(not t.done() for t in self.tasks):
            # Served by a loop running in another thread: publish() reaches it thread-safely,
            # and a second reader and writer would only double the traffic.
            return
        self.loop = loop
        self._thread = threading.get_ident()
        # Made here, not at construction: a fork between the two gets its own identity.
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self._wake = asyncio.Event()
        self.closing = False
        self._read_ok, self._write_ok = False, True
        self.tasks = [loop.create_task(self._read_loop(), name="otel-disconnect fleet reader")]
        if self.write:
            self.tasks.append(
                loop.create_task(self._write_loop(), name="otel-disconnect fleet writer")
            )
        if self.queue:
            self._wake.set()

    async def aclose(self) -> None:
        tasks, self.tasks = self.tasks, []
        self.closing = True  # redis-py may turn a cancellation into its own error: stop anyway
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=TIMEOUT_S)
        self.loop = None

    # -- writing -------------------------------------------------------------------------------

    def publish(self, payload: bytes) -> None:
        """Queue one encoded event; never blocks, never raises into the caller."""
        try:
            queue = self.queue
            # The batch on its way counts too: if it fails it goes back, and must fit.
            if len(queue) + self.sending >= self.queue_max:
                self.metrics.dropped.labels("queue_full").inc()
                return
            queue.append(payload)
            self.metrics.queued.set(len(queue) + self.sending)
            wake, loop = self._wake, self.loop
            if wake is None or loop is None:
                return  # sent once the tasks start
            if threading.get_ident() == self._thread:
                wake.set()
            else:  # a sync database hook in a thread pool
                loop.call_soon_threadsafe(wake.set)
        except Exception:
            internal_error("fleet_publish", self.registry)

    async def _write_loop(self) -> None:
        assert self._wake is not None
        client: Any = None
        delay = BACKOFF_MIN_S
        while not self.closing:
            await self._wake.wait()
            self._wake.clear()
            while self.queue and not self.closing:
                batch = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
                self.sending = len(batch)
                try:
                    if client is None:
                        client = _client(self.url, TIMEOUT_S)
                    pipe = client.pipeline(transaction=False)
                    for payload in batch:
                        pipe.xadd(self.key, {events.FIELD: payload}, maxlen=STREAM_MAXLEN)
                    await pipe.execute()
                except Exception:
                    internal_error("fleet_publish", self.registry)
                    await _drop_client(client)
                    client = None
                    self.sending = 0
                    self._requeue(batch)
                    self._set(write_ok=False)
                    await asyncio.sleep(_jitter(delay))
                    delay = min(BACKOFF_MAX_S, delay * 2)
                    continue
                delay = BACKOFF_MIN_S
                self.sending = 0
                self.metrics.queued.set(len(self.queue))
                for payload in batch:
                    self.metrics.published.labels(_kind_of(payload)).inc()
                self._set(write_ok=True)

    def _requeue(self, batch: list[bytes]) -> None:
        room = max(0, self.queue_max - len(self.queue))
        keep = batch[:room]
        if len(batch) > room:
            self.metrics.dropped.labels("queue_full").inc(len(batch) - room)
        self.queue.extendleft(reversed(keep))
        self.metrics.queued.set(len(self.queue))

    # -- reading -------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        client: Any = None
        delay = BACKOFF_MIN_S
        # None until the first connection: then after the newest event kept (or from the first
        # one, from_start). After a reconnection, after the last event read: what was written
        # while this reader was away is read too. A Redis that restarted empty gives its new
        # events ids from its clock, after every id of the old stream.
        last: str | None = "0-0" if self.from_start else None
        while not self.closing:
            try:
                if client is None:
                    client = _client(self.url, TIMEOUT_S + self.block_ms / 1000)
                    if last is None:
                        last = await _last_id(client, self.key)
                    else:
                        await client.ping()  # connected: up before the first XREAD returns
                    self._set(read_ok=True)
                    delay = BACKOFF_MIN_S
                found = await client.xread({self.key: last}, count=BATCH, block=self.block_ms)
                for _key, entries in found or ():
                    for entry_id, fields in entries:
                        last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        self._handle(fields)
            except asyncio.CancelledError:
                await _drop_client(client)
                raise
            except Exception:
                internal_error("fleet_read", self.registry)
                await _drop_client(client)
                client = None
                self._set(read_ok=False)
                await asyncio.sleep(_jitter(delay))
                delay = min(BACKOFF_MAX_S, delay * 2)

    def _handle(self, fields: Any) -> None:
        metrics = self.metrics
        try:
            event = events.parse(fields.get(events.FIELD) if isinstance(fields, dict) else None)
        except events.Malformed:
            metrics.dropped.labels("malformed").inc()
            return
        if event.fleet != self.fleet:
            metrics.dropped.labels("foreign").inc()
            return
        if event.origin == self.origin:
            return  # our own, already known locally
        metrics.received.labels(KIND_NAMES[event.kind]).inc()
        try:
            self.on_event(event)
        except Exception:
            internal_error("fleet_event", self.registry)

    def _set(self, *, read_ok: bool | None = None, write_ok: bool | None = None) -> None:
        if read_ok is not None:
            self._read_ok = read_ok
        if write_ok is not None:
            self._write_ok = write_ok
        self.metrics.up.set(1 if self._read_ok and self._write_ok else 0)


def _client(url: str, timeout_s: float) -> Any:
    import redis.asyncio as redis

    # No retries inside redis-py: the loops here back off themselves, and a request never waits.
    return redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=TIMEOUT_S,
        retry=None,
        health_check_interval=0,
    )


async def _drop_client(client: Any) -> None:
    if client is not None:
        with contextlib.suppress(Exception):  # already broken
            await client.aclose()


async def _last_id(client: Any, key: str) -> str:
    """Where this reader starts: after the newest event now kept (a restarted Redis starts over)."""
    newest = await client.xrevrange(key, count=1)
    if not newest:
        return "0-0"
    entry_id = newest[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


KIND_NAMES = {"r": "retry", "o": "orphan", "x": "over"}


def _kind_of(payload: bytes) -> str:
    # Events are made by this package (events.py), so the kind is found by its compact marker.
    for kind, name in KIND_NAMES.items():
        if b'"k":"%s"' % kind.encode() in payload:
            return name
    return "other"


def _jitter(delay: float) -> float:
    return delay * (0.5 + random.random() / 2)
