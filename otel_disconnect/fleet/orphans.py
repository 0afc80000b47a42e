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
    # By database name, then backend pid in arrival order: a scrape's prune looks up int pids,
    # not (name, pid) tuples hashed one by one, and only among the claims older than its query.

    def __init__(self, max_claims: int = MAX_CLAIMS) -> None:
        self.max_claims = max_claims
        self._by_db: dict[str, collections.OrderedDict[int, Claim]] = {}
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def on_event(self, event: events.Event) -> None:
        with self._lock:
            claims = self._by_db.get(event.db)
            if event.kind == "x":
                if claims is not None and claims.pop(event.pid, None) is not None:
                    self._count -= 1
                return
            if event.kind != "o":
                return
            if claims is None:
                claims = self._by_db[event.db] = collections.OrderedDict()
            old = claims.pop(event.pid, None)
            if old is not None:
                self._count -= 1
            same = old is not None and old.owner == event.owner and old.origin == event.origin
            claims[event.pid] = Claim(
                event.owner,
                event.trace_id,
                event.route,
                event.origin,
                time.monotonic(),
                old.id if same and old is not None else next(_ids),
            )
            self._count += 1
            while self._count > self.max_claims:
                # Oldest out: of this database, or of the fullest when this one is the newcomer.
                victims = claims if len(claims) > 1 else max(self._by_db.values(), key=len)
                victims.popitem(last=False)
                self._count -= 1

    def snapshot(self) -> dict[tuple[str, int], Claim]:
        with self._lock:
            return {(db, pid): c for db, claims in self._by_db.items() for pid, c in claims.items()}

    def find(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], Claim]:
        """The claims on these backends only: a scrape looks up its idle-in-transaction
        backends, not a copy of every claim."""
        found: dict[tuple[str, int], Claim] = {}
        if not keys:
            return found
        with self._lock:
            by_db = self._by_db
            for key in keys:
                claims = by_db.get(key[0])
                claim = claims.get(key[1]) if claims is not None else None
                if claim is not None:
                    found[key] = claim
        return found

    def prune(self, present: dict[str, set[int]], before: float) -> None:
        """Forget claims on backends a query started at ``before`` no longer saw, by database
        name (a claim that arrived after the query started may name a backend the query could
        not know yet)."""
        empty: set[int] = set()
        with self._lock:
            for db, claims in self._by_db.items():
                # Arrival order (a claim that changes moves to the end): the oldest first, the
                # few that came during the query last.
                oldest = next(iter(claims.values()), None)
                if oldest is None or oldest.received >= before:
                    continue
                gone = claims.keys() - present.get(db, empty)  # a set difference, in C
                for pid in reversed(claims):
                    if claims[pid].received < before:
                        break
                    gone.discard(pid)
                for pid in gone:
                    del claims[pid]
                self._count -= len(gone)
