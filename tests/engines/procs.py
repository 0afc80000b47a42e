"""Servers in other virtual environments: started on free ports, logs kept, metrics scraped."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ..servers import RawClient, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    def __init__(self, popen: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.popen = popen
        self.port = port
        self.log = log

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> bytes:
        request = urllib.request.Request(self.url(path), headers=headers or {})
        with urllib.request.urlopen(request, timeout=10) as response:
            body: bytes = response.read()
            return body

    def samples(self, path: str, headers: dict[str, str] | None = None) -> dict[Any, float]:
        """{(name, frozenset(labels)): value} of a Prometheus exposition."""
        found: dict[Any, float] = {}
        for family in text_string_to_metric_families(self.get(path, headers).decode()):
            for s in family.samples:
                found[(s.name, frozenset(s.labels.items()))] = s.value
        return found

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def quiet_otel(service: str) -> dict[str, str]:
    """`opentelemetry-instrument` exporting nothing: the package's own metrics are what is read."""
    return {
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_SERVICE_NAME": service,
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """A sample's value; 0 when absent. Labels not given must match any value (summed)."""
    total = 0.0
    for (sname, slabels), v in samples.items():
        if sname == name and all((k, w) in slabels for k, w in labels.items()):
            total += v
    return total


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def settled(
    metrics: Callable[[], dict[Any, float]], before: dict[Any, float], n: float, route: str
) -> dict[Any, float]:
    """``metrics()`` once ``n`` more requests on ``route`` than in ``before`` have ended."""

    def check() -> dict[Any, float] | None:
        m = metrics()
        return m if delta(before, m, "otel_disconnect_requests_total", route=route) >= n else None

    found: dict[Any, float] = wait_for(check, timeout=30)
    return found


def assert_clean_log(proc: Proc, samples: dict[Any, float], tracebacks: bool = True) -> None:
    """Nothing from the package in the server's log (no traceback at all, with ``tracebacks``)
    and no internal error counted in ``samples``."""
    log = proc.log_text()
    if tracebacks:
        assert "Traceback" not in log, log[-4000:]
    assert "otel_disconnect" not in log, log[-4000:]
    assert value(samples, "otel_disconnect_internal_errors_total") == 0


@contextlib.contextmanager
def started(
    argv: list[str],
    log: Path,
    ready_path: str,
    *,
    env: dict[str, str] | None = None,
    port: int | None = None,
    timeout: float = 180.0,
) -> Iterator[Proc]:
    """Run ``argv`` (``{port}`` replaced), wait until ``ready_path`` answers, stop it after."""
    port = port or free_port()
    full_env = {**os.environ, **(env or {})}
    # This checkout's code, whichever checkout built the cached environment's editable install.
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    full_env = {k: v for k, v in full_env.items() if not k.startswith("PYTEST_")}
    out = log.open("wb")
    popen = subprocess.Popen(
        [a.replace("{port}", str(port)) for a in argv],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=full_env,
        start_new_session=True,
    )
    proc = Proc(popen, port, log)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if popen.poll() is not None:
                tail = proc.log_text()[-4000:]
                raise RuntimeError(f"{argv[:3]} exited ({popen.returncode}):\n{tail}")
            try:
                proc.get(ready_path)
                break
            except Exception:
                if time.monotonic() > deadline:
                    tail = proc.log_text()[-4000:]
                    raise RuntimeError(f"{argv[:3]} not ready:\n{tail}") from None
                time.sleep(0.2)
        yield proc
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        out.close()


def read_response(client: RawClient) -> bytes:
    """One whole HTTP/1.1 response: by Content-Length, or to the last chunk."""
    client.read_until(b"\r\n\r\n", timeout=30)
    head = bytes(client.received).split(b"\r\n\r\n", 1)[0]
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    if length is None:
        return bytes(client.read_until(b"\r\n0\r\n\r\n", timeout=30))
    wanted = len(head) + 4 + int(length.group(1))
    while len(client.received) < wanted:
        client.sock.settimeout(30)
        chunk = client.sock.recv(65536)
        assert chunk, client.received[-300:]
        client.received += chunk
    return bytes(client.received)
