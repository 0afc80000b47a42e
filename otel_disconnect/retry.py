"""Retry-after-disconnect detection, with bounded memory and only hashes kept.

A request repeats one that disconnected when it *started after* that disconnect was seen, and
within ``retry_window_s`` of it, and it is the same request from the same client. "The same" is,
first match wins:

1. the same ``Idempotency-Key`` header (and method and route);
2. the same identity from the app (``retry_identity=callable(scope)``, or
   ``request.state.otel_disconnect_client`` set by its auth code), method, route and body;
3. the same client address as the server gives it (``scope["client"]``: behind a proxy that is
   the proxy's, unless the server is told to trust its forwarding headers), method, route, body.

A request that began before the disconnect (an HTTP/2 neighbour of a reset stream, a reader who
had started before another client hung up) is never its retry, and no request is its own.
Only an 8-byte digest of those is kept, at most ``MAX_ENTRIES`` of them, oldest first out.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

from ._types import Scope

MAX_ENTRIES = 10_000
# Disconnect times kept per fingerprint: a retry that itself disconnects must not hide the
# earlier disconnect from a request that started between the two.
TIMES_PER_ENTRY = 4
# Entries outlive the window by this factor, so a retry that runs long before it is checked (at
# its final body) still finds the disconnect that came before its start.
KEEP_FACTOR = 2

IdentityHook = Callable[[Scope], "str | bytes | None"]
STATE_KEY = "otel_disconnect_client"  # request.state.otel_disconnect_client = user id


class BodyDigest:
    """The running digest of a request body, fed chunk by chunk as it passes."""

    __slots__ = ("_hash",)

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)

    def digest(self) -> bytes:
        return self._hash.digest()


def client_identity(scope: Scope, hook: IdentityHook | None) -> bytes | None:
    """The app's identity for this client: the hook's answer, else ``request.state``'s."""
    value = hook(scope) if hook is not None else None
    if value is None:
        state = scope.get("state")
        if isinstance(state, dict):
            value = state.get(STATE_KEY)
    if value is None:
        return None
    return value if isinstance(value, bytes) else str(value).encode()


def fingerprint(
    scope: Scope, route: str, body: BodyDigest | None, identity: bytes | None = None
) -> bytes:
    method = scope.get("method", "")
    key = None
    for name, value in scope.get("headers") or ():
        if name.lower() == b"idempotency-key":
            key = value
            break
    h = hashlib.blake2b(digest_size=8)
    digest = body.digest() if body is not None else b""
    if key is not None:
        parts = [b"key", key, method.encode(), route.encode()]
    elif identity is not None:
        parts = [b"id", identity, method.encode(), route.encode(), digest]
    else:
        client = scope.get("client") or ("", 0)
        parts = [b"req", str(client[0]).encode(), method.encode(), route.encode(), digest]
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


class RetryTracker:
    """Fingerprints of recently disconnected requests. One per middleware, shared by requests."""

    __slots__ = ("entries", "max_entries", "publish", "window_s")

    def __init__(self, window_s: float, max_entries: int = MAX_ENTRIES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, tuple[float, ...]] = OrderedDict()
        # Set by the fleet channel (redis_url): tells the other processes, off the request path
        # (fingerprint, disconnect time, the request's start time, both time.perf_counter()).
        self.publish: Callable[[bytes, float, float], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def __len__(self) -> int:
        return len(self.entries)

    # Callers on the hot path test ``tracker.entries`` (a dict, truthy when non-empty) directly.

    def remember(self, fp: bytes, at: float | None = None) -> None:
        """A request with this fingerprint disconnected at ``at`` (``time.perf_counter()``)."""
        at = time.perf_counter() if at is None else at
        entries = self.entries
        times = entries.pop(fp, ())
        entries[fp] = (*times[-(TIMES_PER_ENTRY - 1) :], at)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def disconnected(self, fp: bytes, at: float, started: float | None = None) -> None:
        """A request of this process that began at ``started`` disconnected at ``at``: remember
        it, and tell the fleet."""
        self.remember(fp, at)
        if self.publish is not None:
            self.publish(fp, at, at if started is None else started)

    def is_retry(self, fp: bytes, started: float, now: float | None = None) -> bool:
        """True when ``fp`` disconnected before ``started`` (a request's own start, on the
        ``time.perf_counter()`` clock) and at most ``window_s`` before it."""
        if not self.entries:
            return False
        self._expire(time.perf_counter() if now is None else now)
        window = self.window_s
        return any(0 < started - at <= window for at in self.entries.get(fp, ()))

    def _expire(self, now: float) -> None:
        entries = self.entries
        keep = self.window_s * KEEP_FACTOR
        while entries:
            times = next(iter(entries.values()))
            if now - times[-1] <= keep:
                break
            entries.popitem(last=False)
