"""``uvicorn --workers 2`` with ``PROMETHEUS_MULTIPROC_DIR``, for the multi-process tests."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .servers import RawClient, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def value(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(labels)}\}})? (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def duplicates(text: str) -> list[str]:
    """Series (name and labels) or family headers that appear more than once in one scrape."""
    keys = Counter(
        line.rsplit(" ", 1)[0] if not line.startswith("#") else " ".join(line.split(" ", 3)[:3])
        for line in text.splitlines()
        if line
    )
    return [key for key, n in keys.items() if n > 1]


def hello(port: int) -> int:
    with RawClient(port) as client:
        client.request("GET", "/hello", headers={"Connection": "close"})
        body = client.read_all()
    match = re.search(rb'"pid":(\d+)', body)
    assert match, body
    return int(match.group(1))


def both_workers(port: int) -> tuple[set[int], int]:
    """Concurrent requests until both workers have answered (the kernel picks the worker)."""
    pids: set[int] = set()
    sent = 0
    # A worker still importing the app on a busy machine takes no connection yet: keep asking
    # until both have answered, within a deadline.
    deadline = time.monotonic() + 120
    with ThreadPoolExecutor(8) as pool:
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.update(pool.map(lambda _: hello(port), range(16)))
            sent += 16
    assert len(pids) == 2, "both workers answered"
    return pids, sent


@contextlib.contextmanager
def uvicorn_workers(directory: Path, **env: str) -> Iterator[int]:
    port = free_port()
    environ = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.sample.multiproc_app:app",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=environ,
    )
    try:
        wait_for(lambda: scrape(port), timeout=60)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
