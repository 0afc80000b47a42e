"""Instructions per request, counted by valgrind (callgrind): repeatable on a busy machine.

Wall-clock and CPU-time ratios on shared 2-core machines swing by ±30% between rounds; an
instruction count does not. Two measurements, each ``N1`` and then ``N2`` requests after the same
warm-up, in two processes with a fixed hash seed; the difference of their totals divided by
``N2 - N1`` is the per-request cost, free of start-up and shut-down:

- ``uvicorn``: the server process the README's figures measure (one uvicorn worker, httptools,
  uvloop, serving bench/benchapp.py) runs under callgrind; a client outside it sends the requests
  one after another on one keep-alive connection. Everything the server does per request is
  counted: HTTP parsing, the event loop, the app, the garbage collector.
- ``uvicorn-concurrent``: the same worker with ``CONNECTIONS`` clients at once, each on its own
  keep-alive connection, so that many requests are in flight together (what wrk does): the cost
  of objects living across other requests (garbage-collector traversals, promotions) is counted.
- ``in-process``: the app alone, driven by the fake uvicorn-like server of bench/micro.py with the
  garbage collector off after the warm-up: only the ASGI stack, so the ratio is a stricter one.

Usage: ``python bench/instructions.py [--variants ...] [--modes uvicorn in-process]
[--paths /hello /stream /chat] [--n1 N --n2 M]``. Variants: those of bench/benchapp.py, plus
``bare`` and ``disconnect`` (the middleware alone, no OpenTelemetry). ``/chat`` streams 10
OpenAI ``chat.completion.chunk`` events and ``[DONE]``: per chunk added = added per request / 11.

Per token chunk: ``--chunks SHORT LONG`` measures ``/chat?chunks=SHORT`` and ``?chunks=LONG``,
``--n2`` requests each after the same warm-up at the same length; the difference of the two
totals divided by the extra chunks is what one more streamed token chunk costs, free of all the
per-request work, for each variant (``added`` is its difference to ``bare``, or to ``otel`` for
the variants on OpenTelemetry). ``--code NAME=PATH`` (repeatable) runs the variants that import
otel-disconnect once per checkout, with PATH first on the server's ``PYTHONPATH``, side by side
in one run: ``--code main=/work/main --code this=.``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procs  # noqa: E402  (bench/ is not a package)

MODES = ("uvicorn", "uvicorn-concurrent", "in-process")
WARMUP = 100
CONNECTIONS = 32


def _drive(variant: str, path: str, n: int) -> None:
    sys.path[:0] = [os.environ.get("BENCH_CODE") or str(HERE.parent), str(HERE)]
    import benchapp
    import micro

    async def run(app: object, k: int) -> None:
        for _ in range(k):
            cycle = micro.FakeCycle()
            await app(micro._scope(path), cycle.receive, cycle.send)  # type: ignore[operator]

    app = benchapp.create_app(variant)
    asyncio.run(run(app, WARMUP))  # warm-up: middleware stack built, caches filled
    # Without the collector: a full collection landing in one window and not the other would
    # swamp the difference. Garbage per request is measured on its own (micro.py, the tests).
    gc.collect()
    gc.disable()
    asyncio.run(run(app, n))


def _count(variant: str, path: str, n: int, code: str | None = None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, __file__, "--drive", variant, path, str(n)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": "0", "BENCH_CODE": code or ""},
        )
    return _collected(result.stderr)


def _collected(valgrind_output: str) -> int:
    match = re.search(r"Collected : (\d+)", valgrind_output)
    assert match, valgrind_output[-2000:]
    return int(match.group(1))


def _recv_until(conn: socket.socket, buf: bytearray, done: Callable[[bytearray], bool]) -> None:
    while not done(buf):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk


def _get(conn: socket.socket, path: str) -> None:
    """One request on a keep-alive connection, read to the end of its response (a body with a
    Content-Length, or a chunked stream up to its last chunk)."""
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    buf = bytearray()
    _recv_until(conn, buf, lambda b: b"\r\n\r\n" in b)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    body = bytearray(rest)
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    if match:
        length = int(match.group(1))
        _recv_until(conn, body, lambda b: len(b) >= length)
    else:  # one request at a time: the stream's last chunk ends what the server sends
        _recv_until(conn, body, lambda b: b.endswith(b"0\r\n\r\n"))


def _count_uvicorn(
    variant: str,
    path: str,
    n: int,
    connections: int = 1,
    code: str | None = None,
    *,
    gc_off: bool = False,
) -> int:
    """The whole uvicorn worker under callgrind, ``WARMUP + n`` requests from outside it, on
    ``connections`` keep-alive connections at once (each sends its share one after another).
    ``gc_off``: the cycle collector off before the warm-up (see ``_per_chunk``)."""
    with tempfile.TemporaryDirectory() as tmp:
        callgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out"]
        server = procs.Server(variant, "uvicorn-httptools", callgrind, code=code)
        try:
            server.wait_ready(timeout=900)  # valgrind runs Python some 50 times slower
            imported = server.stats()["otel_disconnect"]
            if code and imported and not Path(imported).is_relative_to(Path(code).resolve()):
                raise RuntimeError(f"{variant} imported {imported}, not the code of {code}")
            with socket.create_connection(("127.0.0.1", server.port), timeout=300) as conn:
                if gc_off:  # before the warm-up, whose chunks count too
                    _get(conn, "/_bench/gc-off")
                for _ in range(WARMUP):
                    _get(conn, path)

            def client(share: int) -> None:
                with socket.create_connection(("127.0.0.1", server.port), timeout=600) as conn:
                    for _ in range(share):
                        _get(conn, path)

            shares = [n // connections + (i < n % connections) for i in range(connections)]
            with ThreadPoolExecutor(connections) as pool:
                list(pool.map(client, shares))  # re-raises a client's failure
            # A graceful shut-down, however long it takes under valgrind: callgrind writes its
            # totals when the process exits.
            os.killpg(server.proc.pid, signal.SIGINT)
            server.proc.wait(timeout=900)
            return _collected(server.output())
        finally:
            server.stop()


def _table(title: str, per_request: dict[str, float]) -> list[str]:
    base = per_request.get("otel")
    lines = [f"| variant | instructions/request ({title}) | vs otel |", "|---|---:|---:|"]
    for v, count in per_request.items():
        ratio = f"{count / base:.3f} ({count - base:+,.0f})" if base and v != "otel" else ""
        lines.append(f"| {v} | {count:,.0f} | {ratio} |")
    return lines


def _per_chunk(args: argparse.Namespace) -> None:
    """``--chunks SHORT LONG``: instructions per additional token chunk, per variant and code."""
    short, long = args.chunks
    codes: list[tuple[str, str | None]] = [
        (name, str(Path(path).resolve())) for name, _, path in (c.partition("=") for c in args.code)
    ] or [("this", None)]
    runs: list[tuple[str, str, str, str | None]] = []  # (mode, label, variant, code path)
    for mode in args.modes:
        for variant in args.variants:
            if "disconnect" in variant:
                runs += [(mode, f"{variant} ({name})", variant, path) for name, path in codes]
            else:
                runs.append((mode, variant, variant, None))

    def count(run: tuple[str, str, str, str | None], chunks: int) -> int:
        mode, _, variant, code = run
        path = f"/chat?chunks={chunks}"
        if mode == "in-process":
            return _count(variant, path, args.n2, code)
        connections = CONNECTIONS if mode == "uvicorn-concurrent" else 1
        # Without the collector: where a full collection lands differs between the two runs by
        # chance, by tens of millions of instructions under OpenTelemetry (dozens of objects per
        # chunk); the middleware's per-chunk path allocates nothing the collector tracks.
        return _count_uvicorn(variant, path, args.n2, connections, code, gc_off=True)

    jobs = [(run, chunks) for run in runs for chunks in (short, long)]
    with ThreadPoolExecutor(2) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: count(*job), jobs), strict=True))
    requests = WARMUP + args.n2  # the warm-up streams the same length: its chunks count too
    for mode in args.modes:
        per_chunk = {
            label: (totals[(run, long)] - totals[(run, short)]) / (requests * (long - short))
            for run in runs
            if run[0] == mode
            for label in [run[1]]
        }
        print(f"| variant | instructions per token chunk (`/chat`, {mode}, {short} vs {long} "
              "chunks) | added |")
        print("|---|---:|---:|")
        for run in runs:
            if run[0] != mode:
                continue
            label, variant = run[1], run[2]
            base = "otel" if variant.startswith("otel") else "bare"
            added = ""
            if base in per_chunk and label != base:
                added = f"{per_chunk[label] - per_chunk[base]:+,.0f}"
            print(f"| {label} | {per_chunk[label]:,.0f} | {added} |")
        print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["otel", "otel+disconnect", "otel+naive"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--paths", nargs="+", default=["/hello", "/stream", "/chat"],
                        choices=["/hello", "/stream", "/chat"])
    parser.add_argument("--n1", type=int, default=100)
    parser.add_argument("--n2", type=int, default=400)
    parser.add_argument("--chunks", nargs=2, type=int, metavar=("SHORT", "LONG"),
                        help="per token chunk: /chat?chunks=SHORT against LONG, --n2 requests")
    parser.add_argument("--span-processor", choices=("batch", "simple"), default="batch",
                        help="OpenTelemetry's span processor: batch (production, a worker "
                        "thread) or simple (spans exported in the request: repeatable counts)")
    parser.add_argument("--code", action="append", default=[], metavar="NAME=PATH",
                        help="a checkout whose otel_disconnect is measured (repeatable)")
    parser.add_argument("--drive", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["BENCH_SPAN_PROCESSOR"] = args.span_processor  # the servers inherit it
    if args.drive:
        _drive(args.drive[0], args.drive[1], int(args.drive[2]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    os.environ["PYTHONHASHSEED"] = "0"  # the servers inherit it
    redis = _redis() if any(v.endswith("-fleet") for v in args.variants) else None
    try:
        _measure(args)
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=30)
            shutil.rmtree(os.path.dirname(os.environ["BENCH_REDIS_URL"][len("unix://") :]))


def _redis() -> subprocess.Popen[bytes]:
    """A redis-server on a Unix socket for the ``-fleet`` variants (their channel's tasks idle
    in one blocking read: what is counted is what the channel adds to each request)."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is needed for the -fleet variants: apt-get install redis-server")
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    sock = f"{directory}/redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no",
         "--dir", directory], stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    os.environ["BENCH_REDIS_URL"] = f"unix://{sock}"
    return proc


def _measure(args: argparse.Namespace) -> None:
    if args.chunks:
        _per_chunk(args)
        return
    counters: dict[str, Callable[[str, str, int], int]] = {
        "uvicorn": _count_uvicorn,
        "uvicorn-concurrent": lambda v, p, n: _count_uvicorn(v, p, n, CONNECTIONS),
        "in-process": _count,
    }
    jobs = [
        (m, p, v, n)
        for m in args.modes
        for p in args.paths
        for v in args.variants
        for n in (args.n1, args.n2)
    ]
    with ThreadPoolExecutor(2) as pool:
        counts = pool.map(lambda job: counters[job[0]](job[2], job[1], job[3]), jobs)
        totals = dict(zip(jobs, counts, strict=True))
    for mode in args.modes:
        for path in args.paths:
            per_request = {
                v: (totals[(mode, path, v, args.n2)] - totals[(mode, path, v, args.n1)])
                / (args.n2 - args.n1)
                for v in args.variants
            }
            where = {
                "uvicorn": "one uvicorn worker",
                "uvicorn-concurrent": f"one uvicorn worker, {CONNECTIONS} connections",
                "in-process": "app in-process",
            }[mode]
            print("\n".join(_table(f"`{path}`, {where}", per_request)) + "\n", flush=True)


if __name__ == "__main__":
    main()
