"""Benchmark servers as real processes (one per variant and server), pinned to a CPU when we can.

Each process serves ``served:app``; ``/_bench/stats`` tells its CPU time, so the figure is the
worker's own even when the server forks (Granian).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVER_KINDS = ("uvicorn-httptools", "uvicorn-h11", "hypercorn", "granian")


def cpu_sets() -> tuple[list[str], list[str]]:
    """``taskset`` prefixes for the server and for the load generator: different CPUs when the
    machine has two or more and taskset exists, else nothing."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return [], []
    return ["taskset", "-c", str(cpus[0])], ["taskset", "-c", str(cpus[1])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(kind: str, port: int) -> list[str]:
    py = sys.executable
    if kind.startswith("uvicorn-"):
        return [
            py, "-m", "uvicorn", "served:app", "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--log-level", "warning", "--http", kind.split("-", 1)[1],
            "--loop", "uvloop", "--lifespan", "off",
        ]
    if kind == "hypercorn":
        return [py, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
                "served:app"]
    if kind == "granian":
        exe = Path(py).with_name("granian")
        return [str(exe), "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1", "--log-level", "warning", "served:app"]
    raise ValueError(f"unknown server {kind!r}; expected one of {SERVER_KINDS}")


class Server:
    def __init__(self, variant: str, kind: str = "uvicorn-httptools", pin: list[str] | None = None,
                 code: str | None = None):
        """``code``: a checkout whose ``otel_disconnect`` the server imports (first on its
        ``PYTHONPATH``, after bench/), to measure two versions side by side."""
        self.variant = variant
        self.kind = kind
        self.port = free_port()
        env = dict(os.environ, BENCH_VARIANT=variant, PYTHONPATH=os.pathsep.join(
            p for p in (str(HERE), code, os.environ.get("PYTHONPATH", "")) if p))
        # A file, not a pipe: a chatty server must never block on a full pipe mid-benchmark.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [*(pin or []), *_command(kind, self.port)], cwd=HERE, env=env,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> Server:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} ({self.variant}) exited at start-up:\n{self.output()}")
            try:
                self.stats()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.kind} ({self.variant}) not ready in {timeout}s") from None
                time.sleep(0.05)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url("/_bench/stats"), timeout=10) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data

    def stop(self) -> None:
        if self.proc.poll() is None:
            # The whole session we started: Granian's worker is a child of its main process.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]


@contextlib.contextmanager
def running(variant: str, kind: str = "uvicorn-httptools",
            pin: list[str] | None = None) -> Iterator[Server]:
    server = Server(variant, kind, pin)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
