"""Garbage-collector work per request with many requests in flight, the app driven in-process.

    python bench/gc_concurrency.py [--requests 20000] [--concurrency 32] [--path /stream]

An object graph that outlives its request (a callback still scheduled, a context copy holding the
span) costs nothing in a one-at-a-time benchmark but, with requests in flight, is alive when a
young collection runs: it is traversed, promoted, and makes collections more frequent. Each
variant runs in its own process (the same warm-up, then the measured requests) and reports
collections per generation, GC pause and CPU time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _measure(variant: str, requests: int, concurrency: int, path: str) -> dict[str, Any]:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import benchapp
    import micro

    app = benchapp.create_app(variant)

    async def run(n: int) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                cycle = micro.FakeCycle()
                await app(micro._scope(path), cycle.receive, cycle.send)

        await asyncio.gather(*(one() for _ in range(n)))

    asyncio.run(run(2000))
    gc.collect()
    counts = [0, 0, 0]
    pause = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            pause[1] = time.perf_counter()
        else:
            counts[info["generation"]] += 1
            pause[0] += time.perf_counter() - pause[1]

    gc.callbacks.append(on_gc)
    cpu = time.process_time()
    asyncio.run(run(requests))
    cpu = time.process_time() - cpu
    gc.callbacks.remove(on_gc)
    return {"variant": variant, "gen0": counts[0], "gen1": counts[1], "gen2": counts[2],
            "pause_us": pause[0] / requests * 1e6, "cpu_us": cpu / requests * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=["otel", "otel+disconnect", "otel+naive"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--path", default="/hello", choices=("/hello", "/stream"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.requests, args.concurrency, args.path)))
        return
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):  # interleaved: the machine's drift hits every variant alike
        for variant in args.variants:
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--requests", str(args.requests),
                 "--concurrency", str(args.concurrency), "--path", args.path],
                capture_output=True, text=True, check=True,
            ).stdout
            rows[variant].append(json.loads(out.splitlines()[-1]))
    print(f"| variant ({args.concurrency} in flight, {args.path}) | gen-0 collections | gen-1 "
          "| gen-2 | GC pause µs/req | CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, runs in rows.items():
        best = min(runs, key=lambda r: r["cpu_us"])
        print(f"| {variant} | {best['gen0']} | {best['gen1']} | {best['gen2']} "
              f"| {best['pause_us']:.1f} | {best['cpu_us']:.1f} |")


if __name__ == "__main__":
    main()
