"""Exporter CPU per scrape with the fleet's claims: 1,000 backends, 10,000 known orphan events.

``python bench/fleet_exporter.py``: times ``PgActivityCollector._build`` (rows to series, the
claims join, the once-per-orphan log check, the prune) on synthetic ``pg_stat_activity`` rows,
best of 100 rounds; the query itself is not included. Each scrape finds 10,000 claims, 1,000 on
live backends (logged once, by the first scrape) and 9,000 on backends that are gone: kept (they
arrived after the query started) or all pruned (the scrape after 9,000 new orphan events).

``--count``: the scrape that keeps its claims in instructions (valgrind's callgrind; repeatable
on a busy machine where CPU time is not): two runs of 1 and 4 scrapes, the difference divided
by 3. (The pruning case is not counted: putting 9,000 claims back between scrapes would be.)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time

from otel_disconnect.db.pg_activity import PgActivityCollector
from otel_disconnect.fleet import events
from otel_disconnect.fleet.orphans import Claims

BACKENDS, CLAIMS, ROUNDS = 1_000, 10_000, 100
COUNTS = (1, 4)


def _add(claims: Claims, pids: range) -> None:
    for pid in pids:
        claims.on_event(events.Event("o", "default", "bench", 0.0, db="app", pid=pid,
                                     owner="ended", trace_id="0" * 32, route="/x"))


class Scrapes:
    """One exporter; before each scrape its claims are back to 10,000: the 1,000 on live
    backends (already logged), and 9,000 on backends that are gone."""

    def __init__(self, prune: bool) -> None:
        logging.getLogger("otel_disconnect.pg").setLevel(logging.CRITICAL)
        self.claims = Claims()
        _add(self.claims, range(1, CLAIMS + 1))
        self.collector = PgActivityCollector("host=unused", registry=None, claims=self.claims)
        self.rows = [("app", f"svc-{pid % 20}", "idle in transaction" if pid % 3 else "active",
                      pid, 1.0, 2.0, 0.0) for pid in range(1, BACKENDS + 1)]
        self.prune = prune
        self.one()  # the first scrape logs each orphan once

    def one(self) -> float:
        if self.prune:  # the 9,000 the previous scrape pruned are back
            _add(self.claims, range(BACKENDS + 1, CLAIMS + 1))
        # Pruned: every stale claim arrived before the query. Kept: they all arrived after it.
        self.collector._query_started = time.monotonic() + (1 if self.prune else -3600)
        started = time.process_time()
        self.collector._build(self.rows)  # type: ignore[arg-type]
        return time.process_time() - started


def timed() -> None:
    for prune, what in ((False, "none pruned"), (True, "9,000 pruned")):
        scrapes = Scrapes(prune)
        best = min(scrapes.one() for _ in range(ROUNDS))
        print(f"{BACKENDS} backends, {CLAIMS} claims ({what}): {best * 1000:.2f} ms CPU per "
              f"scrape (best of {ROUNDS}), without the query")


def drive(scrapes: int) -> None:
    bench = Scrapes(prune=False)
    for _ in range(scrapes):
        bench.one()


def counted() -> None:
    totals = []
    for n in COUNTS:
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
                 sys.executable, __file__, "--drive", str(n)],
                capture_output=True, text=True, check=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
        match = re.search(r"Collected : (\d+)", result.stderr)
        assert match, result.stderr[-2000:]
        totals.append(int(match.group(1)))
    per = (totals[1] - totals[0]) / (COUNTS[1] - COUNTS[0])
    print(f"{BACKENDS} backends, {CLAIMS} claims (none pruned): {per / 1e6:.2f} M instructions "
          "per scrape")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", action="store_true")
    parser.add_argument("--drive", type=int)
    args = parser.parse_args()
    if args.drive is not None:
        drive(args.drive)
    elif args.count:
        counted()
    else:
        timed()
