"""The middleware stack without a server: each variant's app driven by raw ASGI callables.

    python bench/micro.py [--requests 20000] [--rounds 5] [--profile otel+disconnect]

No sockets and no HTTP parsing, so what is left is what the variants differ by, with far less
noise than a load test: CPU µs per ``GET /hello`` through the whole FastAPI app, interleaved in
rounds, and (``--profile VARIANT``) a cProfile of one variant, to see where its time goes.

The fake server's ``receive`` mimics uvicorn's (a bound method of a per-request object from a
``uvicorn.*`` module that parks on a plain future) so otel-disconnect drives it without a task
exactly as it drives uvicorn's.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchapp import DEFAULT_VARIANTS, VARIANTS, create_app

_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


class FakeCycle:
    """One request on the fake server: the first receive() is the (empty) body, the next parks
    until the request ends, as uvicorn's does until the client disconnects."""

    __slots__ = ("_sent_body", "sent")

    def __init__(self) -> None:
        self._sent_body = False
        self.sent = 0

    async def receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return _REQUEST
        await asyncio.get_running_loop().create_future()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent += 1


FakeCycle.__module__ = "uvicorn.protocols.http.fake"  # what receive_pump recognises as a server


def _scope(target: str) -> dict[str, Any]:
    path, _, query = target.partition("?")
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "", "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {},
    }


async def drive(app: Any, path: str, n: int) -> float:
    """CPU seconds per request over ``n`` sequential requests."""
    start = time.process_time()
    for _ in range(n):
        cycle = FakeCycle()
        await app(_scope(path), cycle.receive, cycle.send)
    return (time.process_time() - start) / n


def garbage_per_request(app: Any, path: str = "/hello", n: int = 200) -> float:
    """Objects the cycle collector finds per request: each is a reference cycle (or hangs off
    one) that reference counting could not free, the source of the p99 GC pauses (README:
    Performance)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(drive(app, path, 50))  # warm-up: caches, middleware stack
        gc.collect()
        gc.disable()
        try:
            loop.run_until_complete(drive(app, path, n))
            found = gc.collect()
        finally:
            gc.enable()
    finally:
        loop.close()
    return found / n


def calls_per_request(app: Any, path: str = "/hello", n: int = 200) -> float:
    """Python function calls per request, counted by cProfile: a measure of the work added that
    does not depend on how busy the machine is (the timings above do)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(drive(app, path, 50))
        profiler = cProfile.Profile()
        profiler.enable()
        loop.run_until_complete(drive(app, path, n))
        profiler.disable()
    finally:
        loop.close()
    total: int = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--profile", choices=VARIANTS)
    args = parser.parse_args()
    os.environ.setdefault("OTEL_SDK_DISABLED", "false")
    apps = {v: create_app(v) for v in args.variants}
    loop = asyncio.new_event_loop()
    for app in apps.values():
        loop.run_until_complete(drive(app, args.path, 500))  # warm-up: build middleware stacks
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        loop.run_until_complete(drive(apps[args.profile], args.path, args.requests))
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats("otel_disconnect|prometheus_client|naive", 40)
        print(out.getvalue())
        return
    results: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants):] + args.variants[: r % len(args.variants)]
        for variant in order:
            gc.collect()
            results[variant].append(loop.run_until_complete(drive(apps[variant], args.path,
                                                                  args.requests)) * 1e6)
    base = results.get("otel")
    print(f"| variant | CPU µs/req {args.path} (median [min, max] of {args.rounds}) | vs otel "
          "| Python calls/req | cyclic garbage objects/req |")
    print("|---|---:|---:|---:|---:|")
    for variant, values in results.items():
        added = ""
        if base is not None and variant != "otel":
            diffs = [v - b for v, b in zip(values, base, strict=True)]
            added = f"{statistics.median(diffs):+.1f} µs"
        garbage = garbage_per_request(apps[variant], args.path)
        spread = f"[{min(values):.1f}, {max(values):.1f}]"
        calls = calls_per_request(apps[variant], args.path)
        print(f"| {variant} | {statistics.median(values):.1f} {spread} | {added} | {calls:.0f} "
              f"| {garbage:.1f} |")


if __name__ == "__main__":
    main()
