"""The exporter's claims: found by (database, pid), gone when returned or when a scrape no longer
sees the backend (unless the claim came after the scrape's query started), bounded oldest out."""

from __future__ import annotations

import time

from otel_disconnect.fleet import events
from otel_disconnect.fleet.orphans import Claims


def orphan(claims: Claims, db: str, pid: int, owner: str = "ended") -> None:
    claims.on_event(events.Event("o", "f", "p1", 0.0, db=db, pid=pid, owner=owner))


def test_found_by_database_and_pid_and_gone_when_returned() -> None:
    claims = Claims()
    orphan(claims, "app", 7)
    orphan(claims, "other", 7, "disconnected")
    found = claims.find([("app", 7), ("other", 7), ("app", 8)])
    assert {k: c.owner for k, c in found.items()} == {
        ("app", 7): "ended", ("other", 7): "disconnected"
    }
    claims.on_event(events.Event("x", "f", "p1", 0.0, db="app", pid=7))
    assert list(claims.find([("app", 7), ("other", 7)])) == [("other", 7)]
    assert len(claims) == 1


def test_pruned_when_the_backend_is_gone_unless_newer_than_the_query() -> None:
    claims = Claims()
    orphan(claims, "app", 1)
    orphan(claims, "app", 2)
    query_started = time.monotonic()
    orphan(claims, "app", 3)  # arrived after the query began: it could not see backend 3 yet
    claims.prune({"app": {1}}, query_started)
    assert sorted(k[1] for k in claims.find([("app", p) for p in (1, 2, 3)])) == [1, 3]
    assert len(claims) == 2
    claims.prune({}, time.monotonic())
    assert len(claims) == 0


def test_bounded_oldest_out() -> None:
    claims = Claims(max_claims=3)
    for pid in range(1, 6):
        orphan(claims, "app", pid)
    assert len(claims) == 3
    assert sorted(k[1] for k in claims.find([("app", p) for p in range(1, 6)])) == [3, 4, 5]
    orphan(claims, "b", 1)  # a newcomer database: the oldest of the fullest goes
    assert len(claims) == 3
    assert sorted(claims.find([("app", p) for p in range(1, 6)] + [("b", 1)])) == [
        ("app", 4), ("app", 5), ("b", 1)
    ]
