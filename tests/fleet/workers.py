"""``uvicorn --workers N`` (or one worker) of ``tests/sample/fleet_app.py`` behind one port."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from ..multiproc_server import scrape
from ..servers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent.parent


@contextlib.contextmanager
def fleet_app(metrics_dir: Path, workers: int, **env: str) -> Iterator[int]:
    metrics_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    environ = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    if "OTEL_DISCONNECT_REDIS_URL" not in env:  # the run without Redis really has none
        environ.pop("OTEL_DISCONNECT_REDIS_URL", None)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "tests.sample.fleet_app:app",
            "--workers", str(workers), "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "2",
        ],
        cwd=ROOT,
        env=environ,
    )
    try:
        wait_for(lambda: scrape(port), timeout=60)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
