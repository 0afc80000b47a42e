"""A small closed-loop HTTP/1.1 load generator, the fallback when ``wrk`` is not installed.

``python bench/loadgen.py --port P --path /hello --connections 32 --duration 5`` prints one JSON
line: requests, errors, seconds, requests_per_s, latency p50/p99 in ms. Keep-alive connections,
each sending its next request as soon as the previous response is complete, like wrk. It is far
slower than wrk (it is Python), so it saturates a server less: its figures are comparable with
each other, not with wrk's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    status = head[9:12]
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode(errors='replace')}")
    headers = head.lower()
    marker = b"content-length:"
    at = headers.find(marker)
    if at >= 0:
        end = headers.index(b"\r\n", at)
        await reader.readexactly(int(headers[at + len(marker) : end]))
        return
    if b"transfer-encoding: chunked" not in headers:
        raise RuntimeError("response has neither Content-Length nor chunked encoding")
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def _connection(
    port: int, request: bytes, deadline: float, latencies: list[float], errors: list[str]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            try:
                await _read_response(reader)
            except (RuntimeError, asyncio.IncompleteReadError, ConnectionError) as exc:
                errors.append(repr(exc))
                return
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (``q`` in 0..100); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


async def run(port: int, path: str, connections: int, duration: float) -> dict[str, Any]:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    latencies: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(_connection(port, request, deadline, latencies, errors) for _ in range(connections))
    )
    seconds = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "seconds": seconds,
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    runner = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except (ImportError, AttributeError):
        pass
    result = runner(run(args.port, args.path, args.connections, args.duration))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
