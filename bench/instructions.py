"""Instructions per request, counted by valgrind (callgrind): repeatable on a busy machine.

Wall-clock and CPU-time ratios on shared 2-core machines swing by ±30% between rounds; an
instruction count does not. Each variant's app (bench/benchapp.py) is driven in-process with the
fake uvicorn-like server of bench/micro.py, ``N1`` and then ``N2`` requests after the same warm-up,
in two processes, with the garbage collector off after the warm-up and a fixed hash seed; the
difference of their totals divided by ``N2 - N1`` is the per-request cost, free of start-up.
Usage: ``python bench/instructions.py [--variants ...] [--n1 100 --n2 400]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _drive(variant: str, n: int) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import benchapp
    import micro

    async def run(app: object, k: int) -> None:
        for _ in range(k):
            cycle = micro.FakeCycle()
            await app(micro._scope("/hello"), cycle.receive, cycle.send)  # type: ignore[operator]

    app = benchapp.create_app(variant)
    asyncio.run(run(app, 100))  # warm-up: middleware stack built, caches filled
    # Without the collector: a full collection landing in one window and not the other would
    # swamp the difference. Garbage per request is measured on its own (micro.py, the tests).
    gc.collect()
    gc.disable()
    asyncio.run(run(app, n))


def _count(variant: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, __file__, "--drive", variant, str(n)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    match = re.search(r"Collected : (\d+)", result.stderr)
    assert match, result.stderr[-2000:]
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["otel", "otel+disconnect", "otel+naive"])
    parser.add_argument("--n1", type=int, default=100)
    parser.add_argument("--n2", type=int, default=400)
    parser.add_argument("--drive", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        _drive(args.drive[0], int(args.drive[1]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    jobs = [(v, n) for v in args.variants for n in (args.n1, args.n2)]
    with ThreadPoolExecutor(2) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: _count(*job), jobs), strict=True))
    per_request = {
        v: (totals[(v, args.n2)] - totals[(v, args.n1)]) / (args.n2 - args.n1)
        for v in args.variants
    }
    base = per_request.get("otel")
    print("| variant | instructions/request (/hello) | vs otel |")
    print("|---|---:|---:|")
    for v, count in per_request.items():
        ratio = f"{count / base:.3f} ({count - base:+,.0f})" if base and v != "otel" else ""
        print(f"| {v} | {count:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
