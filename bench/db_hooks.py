"""Overhead of the engine hooks: statements per second with and without ``instrument_engine``.

Two engines on the same database, one instrumented, measured in alternating rounds in one
process (so both see the same machine state); inside a request context, as in an app. Each round
times both engines back to back (in alternating order). Reported: the best round of each (most
statements per second, least CPU time per statement): on a shared machine the other load only
ever slows a round down, so the best of many short rounds is the closest to the cost itself.

    python bench/db_hooks.py                       # sqlite in memory (the hooks' cost, bare)
    python bench/db_hooks.py --url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python bench/db_hooks.py --embedded            # start an embedded PostgreSQL for the run

Workloads: ``execute`` (statements on a held connection), ``transaction`` (check-out, begin,
one statement, commit, check-in: every hook fires once per iteration).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text

from otel_disconnect.context import reset_current, set_current
from otel_disconnect.db.engine import instrument_engine
from otel_disconnect.state import RequestState

SELECT = text("SELECT 1")


Sample = tuple[float, float]  # (statements per wall second, client CPU µs per statement)


class Clock:
    """Wall time and this process's CPU time: on a busy machine the CPU time is the stable one."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def sample(self, n: int) -> Sample:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        return n / wall, cpu / n * 1e6


def execute_sync(engine: Any, n: int) -> Sample:
    with engine.connect() as conn:
        clock = Clock()
        for _ in range(n):
            conn.execute(SELECT)
        sample = clock.sample(n)
        conn.commit()
    return sample


def transaction_sync(engine: Any, n: int) -> Sample:
    clock = Clock()
    for _ in range(n):
        with engine.begin() as conn:
            conn.execute(SELECT)
    return clock.sample(n)


async def execute_async(engine: Any, n: int) -> Sample:
    async with engine.connect() as conn:
        clock = Clock()
        for _ in range(n):
            await conn.execute(SELECT)
        sample = clock.sample(n)
        await conn.commit()
    return sample


async def transaction_async(engine: Any, n: int) -> Sample:
    clock = Clock()
    for _ in range(n):
        async with engine.begin() as conn:
            await conn.execute(SELECT)
    return clock.sample(n)


def _summary(name: str, bare: list[Sample], hooked: list[Sample]) -> Row:
    return (
        name,
        max(s[0] for s in bare), max(s[0] for s in hooked),
        min(s[1] for s in bare), min(s[1] for s in hooked),
    )


# name, bare stmt/s, hooked stmt/s, bare CPU µs/stmt, hooked CPU µs/stmt (best rounds)
Row = tuple[str, float, float, float, float]


def run(url: str, rounds: int, n: int) -> list[Row]:
    is_async = "+asyncpg" in url or "+aiosqlite" in url
    state = RequestState({"type": "http", "method": "GET"})
    token = set_current(state)
    results: list[Row] = []
    try:
        if is_async:
            from sqlalchemy.ext.asyncio import create_async_engine

            async def main() -> None:
                bare = create_async_engine(url)
                hooked = instrument_engine(create_async_engine(url), registry=CollectorRegistry())
                for name, fn in (("execute", execute_async), ("transaction", transaction_async)):
                    await fn(bare, n // 10)
                    await fn(hooked, n // 10)  # warm up both pools and caches
                    b, h = [], []
                    for i in range(rounds):
                        gc.collect()
                        if i % 2:
                            h.append(await fn(hooked, n))
                            b.append(await fn(bare, n))
                        else:
                            b.append(await fn(bare, n))
                            h.append(await fn(hooked, n))
                    results.append(_summary(name, b, h))
                await bare.dispose()
                await hooked.dispose()

            asyncio.run(main())
        else:
            kw: dict[str, Any] = {}
            if url.startswith("sqlite"):
                from sqlalchemy.pool import StaticPool

                kw = {"poolclass": StaticPool}
            bare = create_engine(url, **kw)
            hooked = instrument_engine(create_engine(url, **kw), registry=CollectorRegistry())
            for name, sync_fn in (("execute", execute_sync), ("transaction", transaction_sync)):
                sync_fn(bare, n // 10)
                sync_fn(hooked, n // 10)
                b, h = [], []
                for i in range(rounds):
                    gc.collect()
                    if i % 2:
                        h.append(sync_fn(hooked, n))
                        b.append(sync_fn(bare, n))
                    else:
                        b.append(sync_fn(bare, n))
                        h.append(sync_fn(hooked, n))
                results.append(_summary(name, b, h))
            bare.dispose()
            hooked.dispose()
    finally:
        reset_current(token)
        state.extras = None
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", help="SQLAlchemy URL (repeatable)")
    parser.add_argument("--embedded", action="store_true",
                        help="also run psycopg and asyncpg against an embedded PostgreSQL")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("-n", type=int, default=500, help="iterations per round")
    args = parser.parse_args()
    urls = list(args.url or ["sqlite://"])
    server = None
    if args.embedded:
        from tests.db.pg import EmbeddedPostgres

        server = EmbeddedPostgres().start()
        urls += [server.url("postgresql+psycopg"), server.url("postgresql+asyncpg")]
    try:
        print("| driver | workload | bare stmt/s | hooked stmt/s | hooked/bare "
              "| client CPU µs/stmt bare | hooked | added |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for url in urls:
            driver = url.split("://")[0]
            for name, bare, hooked, bare_cpu, hooked_cpu in run(url, args.rounds, args.n):
                print(f"| {driver} | {name} | {bare:,.0f} | {hooked:,.0f} | {hooked / bare:.2f} "
                      f"| {bare_cpu:.1f} | {hooked_cpu:.1f} | {hooked_cpu - bare_cpu:+.1f} |",
                      flush=True)
    finally:
        if server is not None:
            server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
