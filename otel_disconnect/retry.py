"""Retry-after-disconnect detection, with bounded memory and only hashes kept.

A request repeats one that disconnected when, within ``retry_window_s``, it has the same
``Idempotency-Key`` (and method and route), or else the same client address, method, route and
body. Only an 8-byte digest of those is kept, at most ``MAX_ENTRIES`` of them, oldest first out.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

from ._types import Scope

MAX_ENTRIES = 10_000


class BodyDigest:
    """The running digest of a request body, fed chunk by chunk as it passes."""

    __slots__ = ("_hash",)

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)

    def digest(self) -> bytes:
        return self._hash.digest()


def fingerprint(scope: Scope, route: str, body: BodyDigest | None) -> bytes:
    method = scope.get("method", "")
    key = None
    for name, value in scope.get("headers") or ():
        if name.lower() == b"idempotency-key":
            key = value
            break
    h = hashlib.blake2b(digest_size=8)
    if key is not None:
        parts = [b"key", key, method.encode(), route.encode()]
    else:
        client = scope.get("client") or ("", 0)
        parts = [
            b"req",
            str(client[0]).encode(),
            method.encode(),
            route.encode(),
            body.digest() if body is not None else b"",
        ]
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


class RetryTracker:
    """Fingerprints of recently disconnected requests. One per middleware, shared by requests."""

    __slots__ = ("entries", "max_entries", "window_s")

    def __init__(self, window_s: float, max_entries: int = MAX_ENTRIES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, float] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def __len__(self) -> int:
        return len(self.entries)

    # Callers on the hot path test ``tracker.entries`` (a dict, truthy when non-empty) directly.

    def remember(self, fp: bytes, now: float | None = None) -> None:
        """A request with this fingerprint just disconnected."""
        now = time.monotonic() if now is None else now
        self.entries[fp] = now
        self.entries.move_to_end(fp)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def is_retry(self, fp: bytes, now: float | None = None) -> bool:
        """True when ``fp`` disconnected within the window (checked before ``remember``)."""
        if not self.entries:
            return False
        now = time.monotonic() if now is None else now
        self._expire(now)
        seen = self.entries.get(fp)
        return seen is not None and now - seen <= self.window_s

    def _expire(self, now: float) -> None:
        entries = self.entries
        while entries:
            _, seen = next(iter(entries.items()))
            if now - seen <= self.window_s:
                break
            entries.popitem(last=False)
