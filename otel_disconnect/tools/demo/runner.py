"""``otel-disconnect demo``: PostgreSQL, the LLM simulator, the gateway and the load, then a
summary and an HTML report.

One run (``baseline``) is the gateway as people write it. ``--cancel-on-disconnect`` adds a
second run of the same load against the same gateway with cancellation on, ``protect()``
around its commits and ``guard_stream()`` closing its producer, and the summary puts the two
side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from otel_disconnect.tools.demo.live import LiveView
from otel_disconnect.tools.demo.loadgen import TOKENS_PER_SECOND, LoadConfig, LoadGenerator
from otel_disconnect.tools.demo.stats import Run, take_sample

GRACE_S = 1.5  # after the load stops: let the gateway record the last disconnects
DEFAULT_REPORT = "otel-disconnect-report.html"


class DemoError(Exception):
    """A problem the user can fix (busy port, unreachable database): one line, exit 2."""


@dataclass
class DemoOptions:
    duration: float = 30.0
    database_url: str | None = None
    llm_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    report: Path | None = field(default_factory=lambda: Path(DEFAULT_REPORT))
    cancel_on_disconnect: bool = False
    client_timeout_s: float | None = None
    seed: int | None = None
    live: bool | None = None  # None: a redrawn view on a terminal, log lines otherwise


def client_timeout(options: DemoOptions) -> float:
    """10 s, as clients configure it, but short enough that a short run sees timeouts."""
    if options.client_timeout_s is not None:
        return options.client_timeout_s
    return max(1.0, min(10.0, options.duration / 4))


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def check_database(url: str) -> None:
    from otel_disconnect.tools.demo.app import libpq_url

    try:
        import psycopg

        with psycopg.connect(libpq_url(url), connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except ValueError as exc:
        raise DemoError(f"bad --database-url {redact(url)}: {exc}") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DemoError(f"cannot connect to the database at {redact(url)}: {reason}") from None


def check_llm(url: str) -> None:
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/v1/models", timeout=5.0).raise_for_status()
    except (httpx.HTTPError, ValueError) as exc:
        raise DemoError(f"cannot reach the LLM at {url}: {exc}") from None


class Demo:
    def __init__(self, options: DemoOptions, out: TextIO = sys.stdout) -> None:
        self.options = options
        self.out = out
        self._stack = contextlib.ExitStack()
        self.database_url = ""
        self.llm_url = ""

    def say(self, text: str) -> None:
        self.out.write(f"otel-disconnect demo: {text}\n")
        self.out.flush()

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # -- the pieces ----------------------------------------------------------------------------

    def start_database(self) -> None:
        if self.options.database_url:
            check_database(self.options.database_url)
            self.database_url = self.options.database_url
            return
        from otel_disconnect.tools.demo.postgres import EmbeddedPostgres, PostgresUnavailable

        started = time.monotonic()
        server = EmbeddedPostgres()
        self._stack.callback(server.destroy)
        try:
            server.start()
        except PostgresUnavailable as exc:
            first = str(exc).strip().splitlines()[0]
            raise DemoError(f"cannot start the embedded PostgreSQL: {first}") from None
        self.database_url = server.url()
        self.say(f"PostgreSQL {self.database_url} ready in {time.monotonic() - started:.1f} s")

    def start_llm(self) -> None:
        if self.options.llm_url:
            check_llm(self.options.llm_url)
            self.llm_url = self.options.llm_url
            return
        # Its own process: the simulator's token clock then does not compete with the
        # gateway for this interpreter's lock (that delay would count as work after).
        from otel_disconnect.tools.demo.postgres import free_port

        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "otel_disconnect", "sim", "--port", str(port), "--ttft",
             "0.4", "--tokens-per-second", str(TOKENS_PER_SECOND), "--max-tokens", "4000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self._stack.callback(_stop_process, process)
        self.llm_url = f"http://127.0.0.1:{port}"
        _wait_listening(port, process)
        self.say(f"LLM simulator {self.llm_url} ({TOKENS_PER_SECOND:.0f} tokens/s per request)")

    def run_phase(self, name: str, safe: bool) -> Run:
        from prometheus_client import CollectorRegistry

        from otel_disconnect.tools.demo.app import GatewayConfig, create_app
        from otel_disconnect.tools.demo.serving import Server

        registry = CollectorRegistry()
        config = GatewayConfig(llm_url=self.llm_url, database_url=self.database_url, safe=safe,
                               application_name=f"otel-disconnect-demo-{name}")
        app = create_app(config, registry=registry)
        server = Server(app, self.options.host, self.options.port).start()
        try:
            self.say(f"[{name}] gateway {server.url}/v1/chat/completions, metrics "
                     f"{server.url}/metrics" + (" (cancel_on_disconnect, protect, guard_stream)"
                                                if safe else ""))
            run = Run(name, safe, self.options.duration, client_timeout(self.options))
            asyncio.run(self._drive(run, server.url, registry))
        finally:
            server.stop()
            _terminate_backends(self.database_url, config.application_name)
        return run

    async def _drive(self, run: Run, url: str, registry: Any) -> None:
        o = self.options
        load = LoadGenerator(LoadConfig(url=url, client_timeout_s=client_timeout(o), seed=o.seed))
        view = LiveView(self.out, run.name, o.duration, tty=o.live)
        started = time.monotonic()
        task = asyncio.create_task(load.run(o.duration))

        async def sample() -> None:
            families = await asyncio.to_thread(lambda: list(registry.collect()))
            run.samples.append(take_sample(families, time.monotonic() - started))

        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            await sample()
            view.update(run.samples[-1])
        await task
        await asyncio.sleep(GRACE_S)
        await sample()
        view.update(run.samples[-1])
        run.client_line = load.stats.line()


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if process.poll() is not None:
            err = (process.stderr.read() if process.stderr else b"").decode(errors="replace")
            last = err.strip().splitlines()[-1] if err.strip() else f"exit {process.returncode}"
            raise DemoError(f"the LLM simulator did not start: {last}")
        if time.monotonic() > deadline:
            raise DemoError(f"the LLM simulator did not listen on port {port} in {timeout:.0f} s")
        time.sleep(0.05)


def _terminate_backends(url: str, application_name: str) -> None:
    """A run's zombie transactions must not leak into the next run's figures."""
    from otel_disconnect.tools.demo.app import libpq_url

    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(libpq_url(url), connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = %s", (application_name,))


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> list[Run]:
    from otel_disconnect.tools.demo.serving import check_port
    from otel_disconnect.tools.demo.stats import summary_text

    try:
        check_port(options.host, options.port)
    except OSError as exc:
        raise DemoError(str(exc)) from None
    # Gateway, simulator and clients share one interpreter: hand the GIL over sooner, so a
    # thread waiting on a socket is not held up for the default 5 ms (it shows as work after).
    sys.setswitchinterval(0.0005)
    # The live view says it all; per-backend orphan warnings would scroll it away.
    logging.getLogger("otel_disconnect").setLevel(logging.ERROR)
    # Clients writing to a connection the gateway already closed: expected here.
    # (and asyncpg connections closed under cancellation, reported by asyncio as never retrieved)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    with Demo(options, out) as demo:
        demo.start_database()
        demo.start_llm()
        runs = [demo.run_phase("baseline", safe=False)]
        if options.cancel_on_disconnect:
            runs.append(demo.run_phase("cancel", safe=True))
    out.write("\n" + summary_text(runs) + "\n")
    for run in runs:
        out.write(f"clients [{run.name}]: {run.client_line}\n")
    if options.report is not None:
        from otel_disconnect.tools.demo.report import write_report

        write_report(options.report, runs)
        out.write(f"report: {options.report.resolve()}\n")
    out.flush()
    return runs
