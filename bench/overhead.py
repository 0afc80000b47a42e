"""otel-disconnect's overhead and detection latency, measured side by side in one run.

    python bench/overhead.py                      # ~10 minutes; writes bench/results.md
    python bench/overhead.py --quick              # a few seconds, to check it still runs

Four variants of one FastAPI app (see benchapp.py) each run in their own uvicorn process (one
worker, httptools, uvloop, no access log), pinned to one CPU while the load generator (wrk,
32 connections, or a Python fallback) runs on another. Load phases are interleaved in rounds, in
a rotating order, so machine noise falls on every variant alike. Server CPU time per request is
the server process's CPU time (``time.process_time()``, all its threads) over a phase divided by
the requests the server handled in it (counted in the route handlers). Phases are short (1 s) and
many (60 rounds): this machine's noise moves in seconds, and the verdict on the 5% target is
read from a bootstrap interval of the median paired ratio, not from the median alone. Then
detection latency (detection.py) on each server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
from benchapp import DEFAULT_VARIANTS, VARIANTS
from detection import measure as measure_detection
from procs import HERE, SERVER_KINDS, Server, cpu_sets

ROUTES = ("/hello", "/stream")
BASELINE, CANDIDATE, NAIVE = "otel", "otel+disconnect", "otel+naive"
TARGET_RATIO = 1.05
TARGET_DETECTION_P99_MS = 5.0

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


# -- load generators ------------------------------------------------------------------------


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    requests = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (requests and rps and p50 and p99):
        raise RuntimeError(f"could not parse wrk output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests": int(requests.group(1)),
        "requests_per_s": float(rps.group(1)),
        "p50_ms": _ms(p50.group(1)),
        "p99_ms": _ms(p99.group(1)),
        "errors": errors + (int(non2xx.group(1)) if non2xx else 0),
    }


def run_load(kind: str, url_port: int, path: str, seconds: float, *, connections: int,
             pin: list[str]) -> dict[str, Any]:
    if kind == "wrk":
        out = subprocess.run(
            [*pin, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
             f"http://127.0.0.1:{url_port}{path}"],
            check=True, capture_output=True, text=True, timeout=seconds + 60,
        ).stdout
        return parse_wrk(out)
    # In this process (pinned like wrk, see main()): it is idle while the load runs.
    return asyncio.run(loadgen.run(url_port, path, connections, seconds))


# -- one load phase ---------------------------------------------------------------------------


def phase(server: Server, path: str, args: argparse.Namespace, pin: list[str]) -> dict[str, float]:
    before = server.stats()
    load = run_load(args.loadgen, server.port, path, args.duration,
                    connections=args.connections, pin=pin)
    after = server.stats()
    n = max(1, after["requests"] - before["requests"])
    return {
        **load,
        "cpu_us": (after["cpu_s"] - before["cpu_s"]) / n * 1e6,
        "gc_objects": (after["collected"] - before["collected"]) / n,
        "gc_pause_us": (after["pause_s"] - before["pause_s"]) / n * 1e6,
    }


def overhead(args: argparse.Namespace) -> dict[tuple[str, str], list[dict[str, float]]]:
    server_pin, load_pin = cpu_sets() if args.pin else ([], [])
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with ExitStack() as stack:
        servers = {}
        for variant in args.variants:  # started together: four imports of FastAPI take a while
            servers[variant] = Server(variant, "uvicorn-httptools", server_pin)
            stack.callback(servers[variant].stop)
        for server in servers.values():
            server.wait_ready()
        warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
        for variant in args.variants if args.warmup > 0 else ():
            for path in args.routes:
                phase(servers[variant], path, warm, load_pin)
        for r in range(args.rounds):
            order = args.variants[r % len(args.variants):] + args.variants[: r % len(args.variants)]
            for path in args.routes:
                for variant in order:
                    result = phase(servers[variant], path, args, load_pin)
                    results.setdefault((path, variant), []).append(result)
                    _progress(f"round {r + 1}/{args.rounds} {path:8} {variant:16} "
                              f"{result['cpu_us']:7.1f} us/req "
                              f"{result['requests_per_s']:8.0f} req/s "
                              f"p99 {result['p99_ms']:.2f} ms")
    return results


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- the report -------------------------------------------------------------------------------


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_interval(values: list[float], resamples: int = 4000) -> tuple[float, float]:
    """A 95% bootstrap interval for the median: how far the machine's noise leaves it open."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _spread(values: list[float], fmt: str) -> str:
    return f"{_med(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def overhead_tables(results: dict[tuple[str, str], list[dict[str, float]]],
                    args: argparse.Namespace) -> list[str]:
    lines = [
        "| route | variant | server CPU µs/req | req/s | p50 ms | p99 ms | GC objects/req "
        "| GC pause µs/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path in args.routes:
        for variant in args.variants:
            runs = results[(path, variant)]
            col = {k: [run[k] for run in runs] for k in runs[0]}
            lines.append(
                f"| `{path}` | {variant} | {_spread(col['cpu_us'], '.1f')} "
                f"| {_med(col['requests_per_s']):.0f} | {_med(col['p50_ms']):.2f} "
                f"| {_spread(col['p99_ms'], '.2f')} | {_med(col['gc_objects']):.2f} "
                f"| {_med(col['gc_pause_us']):.2f} |"
            )
    lines += ["", "Added to the OpenTelemetry-instrumented app (paired per round: each round's "
              "ratio to that round's `otel`; the median over rounds with its 95% bootstrap "
              "interval; met when the whole interval is within the target):", "",
              "| route | middleware | added µs/req | ratio to `otel` | 95% interval "
              "| rounds' range | target ≤ 1.05 |",
              "|---|---|---:|---:|---:|---:|:---:|"]
    for path in args.routes:
        for variant in (CANDIDATE, NAIVE):
            if variant not in args.variants or BASELINE not in args.variants:
                continue
            pairs = list(zip(results[(path, BASELINE)], results[(path, variant)], strict=True))
            added = [v["cpu_us"] - b["cpu_us"] for b, v in pairs]
            ratio = [v["cpu_us"] / b["cpu_us"] for b, v in pairs]
            low, high = median_interval(ratio)
            verdict = "-"
            if variant == CANDIDATE:
                verdict = ("yes" if high <= TARGET_RATIO else "**no**" if low > TARGET_RATIO
                           else "not resolved")
            lines.append(f"| `{path}` | {variant} | {_spread(added, '+.1f')} "
                         f"| {_med(ratio):.3f} | [{low:.3f}, {high:.3f}] "
                         f"| [{min(ratio):.3f}, {max(ratio):.3f}] | {verdict} |")
    return lines


def detection_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| server | trials | p50 ms | p99 ms | max ms | target p99 ≤ 5 ms |",
             "|---|---:|---:|---:|---:|:---:|"]
    for row in rows:
        ok = "yes" if row["p99_ms"] <= TARGET_DETECTION_P99_MS else "**no**"
        lines.append(f"| {row['server']} | {row['trials']} | {row['p50_ms']:.2f} "
                     f"| {row['p99_ms']:.2f} | {row['max_ms']:.2f} | {ok} |")
    return lines


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def environment(args: argparse.Namespace) -> str:
    pins = "server and load generator on separate CPUs (taskset)" if args.pin and cpu_sets()[0] \
        else "not pinned"
    versions = ", ".join(
        f"{name} {_version(name)}" for name in
        ("otel-disconnect", "fastapi", "starlette", "uvicorn", "opentelemetry-sdk",
         "opentelemetry-instrumentation-fastapi")
    )
    load = (f"wrk -t1 -c{args.connections}" if args.loadgen == "wrk"
            else f"Python fallback load generator (bench/loadgen.py), {args.connections} "
                 "connections, not comparable with wrk figures")
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (
        f"{datetime.date.today().isoformat()}, commit {commit}, "
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start; {versions}. Load: {load}, "
        f"{args.rounds} rounds of {args.duration:g} s per variant and route, interleaved; {pins}."
    )


def report(args: argparse.Namespace, results: Any, detection: list[dict[str, Any]],
           env: str) -> str:
    out = ["# otel-disconnect benchmark", "", f"Command: `python bench/overhead.py "
           f"{' '.join(args.argv)}`".replace(" `", "`").rstrip() + "  ", env, ""]
    if results:
        out += ["## Overhead (uvicorn, httptools, uvloop, one worker)", "",
                *overhead_tables(results, args), ""]
    if detection:
        out += ["## Detection latency (client socket closed → disconnect recorded)", "",
                *detection_table(detection), ""]
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per load phase")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    parser.add_argument("--detection-trials", type=int, default=200)
    parser.add_argument("--detection-servers", nargs="+", choices=SERVER_KINDS,
                        default=list(SERVER_KINDS))
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-detection", action="store_true")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the server and the load generator to separate CPUs")
    parser.add_argument("--output", type=Path, default=HERE / "results.md")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few seconds: 1 round, short phases, 5 trials")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.duration, args.rounds, args.warmup = 0.3, 1, 0.0
        args.detection_trials = min(args.detection_trials, 5)
        args.detection_servers = args.detection_servers[:1]
    if args.loadgen == "auto":
        args.loadgen = "wrk" if shutil.which("wrk") else "python"
        if args.loadgen == "python":
            _progress("wrk not found: using the Python load generator (install wrk for figures)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _, load_pin = cpu_sets() if args.pin else ([], [])
    if load_pin and args.loadgen == "python":
        os.sched_setaffinity(0, {int(load_pin[-1])})  # the Python load generator runs here
    env = environment(args)
    started = time.monotonic()
    results = {} if args.skip_overhead else overhead(args)
    detection: list[dict[str, Any]] = []
    failures: list[str] = []
    if not args.skip_detection:
        server_pin, _ = cpu_sets() if args.pin else ([], [])
        for kind in args.detection_servers:
            try:
                detection.append(measure_detection(kind, args.detection_trials, server_pin))
            except Exception as exc:  # report the others; fail at the end
                failures.append(f"{kind}: {exc}")
                _progress(f"detection {kind} FAILED: {exc}")
                continue
            _progress(f"detection {kind}: p50 {detection[-1]['p50_ms']:.2f} ms, "
                      f"p99 {detection[-1]['p99_ms']:.2f} ms")
    text = report(args, results, detection, env)
    if failures:
        text += "\nFailed:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    print(text)
    args.output.write_text(text + "\n", encoding="utf-8")
    _progress(f"wrote {args.output} in {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
