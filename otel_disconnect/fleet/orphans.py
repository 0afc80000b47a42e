"""The exporter side: which backends the fleet says are held for an ended or abandoned request.

Filled from the fleet's stream by the reader thread, read by the scrape thread, hence the lock.
Keyed by (database name, backend pid), at most ``MAX_CLAIMS``, oldest out. A claim goes when its
connection is returned (an ``x`` event) or when a scrape no longer sees its backend.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass

from . import events

MAX_CLAIMS = 10_000

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Claim:
    owner: str
    trace_id: str
    route: str
    origin: str
    received: float  # time.monotonic()
    id: int


class Claims:
    def __init__(self, max_claims: int = MAX_CLAIMS) -> None:
        self.max_claims = max_claims
        self._by_key: collections.OrderedDict[tuple[str, int], Claim] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_key)

    def on_event(self, event: events.Event) -> None:
        key = (event.db, event.pid)
        with self._lock:
            if event.kind == "x":
                self._by_key.pop(key, None)
            elif event.kind == "o":
                old = self._by_key.pop(key, None)
                same = old is not None and old.owner == event.owner and old.origin == event.origin
                self._by_key[key] = Claim(
                    event.owner,
                    event.trace_id,
                    event.route,
                    event.origin,
                    time.monotonic(),
                    old.id if same and old is not None else next(_ids),
                )
                while len(self._by_key) > self.max_claims:
                    self._by_key.popitem(last=False)

    def snapshot(self) -> dict[tuple[str, int], Claim]:
        with self._lock:
            return dict(self._by_key)

    def prune(self, present: set[tuple[str, int]], before: float) -> None:
        """Forget claims on backends a query started at ``before`` no longer saw (a claim that
        arrived after the query started may name a backend the query could not know yet)."""
        with self._lock:
            gone = [
                key
                for key, claim in self._by_key.items()
                if key not in present and claim.received < before
            ]
            for key in gone:
                del self._by_key[key]
