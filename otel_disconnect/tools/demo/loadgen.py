"""Clients that hang up the way real ones do, against the demo gateway.

``python -m otel_disconnect.tools.demo.loadgen --url http://127.0.0.1:8000 [--duration 60]``

- readers (streaming): most read a few chunks and close the tab; some give up before the first
  token; some read to the end.
- timeouts (non-streaming, long answers): a 10 s client timeout against a server that needs
  three times as long (its own timeout is 30 s), then a retry with the same request, twice;
  the server keeps working for each one.
- uploaders: a long prompt on a slow link, abandoned half-way through the request body.
- quick: short answers read to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from otel_disconnect.tools.http1 import Connection, Target

ROUTE = "/v1/chat/completions"
TOKENS_PER_SECOND = 40.0  # the simulator's rate in the demo (runner.SIM_CONFIG)


@dataclass(frozen=True)
class LoadConfig:
    url: str
    readers: int = 5
    timeouts: int = 8
    uploaders: int = 2
    quick: int = 2
    client_timeout_s: float = 10.0
    retries: int = 2
    # How much longer than the client's timeout the server needs for a slow answer.
    slowness: float = 3.0
    tokens_per_second: float = TOKENS_PER_SECOND
    seed: int | None = None


@dataclass
class ClientStats:
    """What the clients saw (the server's view is in its /metrics)."""

    sent: int = 0
    completed: int = 0
    hung_up: Counter[str] = field(default_factory=Counter)
    timeouts: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        hung = ", ".join(f"{k} {v}" for k, v in sorted(self.hung_up.items())) or "none"
        errors = sum(self.errors.values())
        return (f"sent {self.sent}, completed {self.completed}, hung up: {hung}, "
                f"timeouts {self.timeouts}, retries {self.retries}, errors {errors}")


def chat_body(user: str, *, stream: bool, max_tokens: int, words: int = 12) -> bytes:
    prompt = " ".join(f"word{i}" for i in range(words))
    return json.dumps({"model": "sim-model", "stream": stream, "max_tokens": max_tokens,
                       "user": user, "messages": [{"role": "user", "content": prompt}]}).encode()


class LoadGenerator:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.target = Target.parse(config.url)
        self.stats = ClientStats()
        self.random = random.Random(config.seed)
        self._stop = asyncio.Event()
        self._open: set[Connection] = set()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, duration: float | None = None) -> ClientStats:
        c = self.config
        kinds = ([self.reader] * c.readers + [self.timeout_client] * c.timeouts
                 + [self.uploader] * c.uploaders + [self.quick] * c.quick)
        tasks = [asyncio.create_task(self._loop(kind, i)) for i, kind in enumerate(kinds)]
        try:
            if duration is None:
                await self._stop.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), duration)
        finally:
            self._stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for conn in list(self._open):
                conn.close()
        return self.stats

    async def _loop(self, kind: object, index: int) -> None:
        name = getattr(kind, "__name__", "client")
        # Staggered starts: not every client hangs up in the same second.
        await self._pause(self.random.uniform(0, min(2.0, self.config.client_timeout_s * 0.2)))
        while not self._stop.is_set():
            try:
                await kind(f"{name}-{index}-{self.random.randrange(10**6)}")  # type: ignore[operator]
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                self.stats.errors[type(exc).__name__] += 1
                await self._pause(0.5)
            await self._pause(self.random.uniform(0.05, 0.3))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _connect(self) -> Connection:
        conn = await Connection.open(self.target)
        self._open.add(conn)
        return conn

    def _hang_up(self, conn: Connection, why: str) -> None:
        self.stats.hung_up[why] += 1
        self._done(conn)

    def _done(self, conn: Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def _request(self, body: bytes) -> Connection:
        conn = await self._connect()
        await conn.send_head(self.target, "POST", ROUTE, len(body))
        await conn.send(body)
        self.stats.sent += 1
        return conn

    # -- the clients ---------------------------------------------------------------------------

    async def reader(self, user: str) -> None:
        conn = await self._request(chat_body(user, stream=True, max_tokens=120))
        roll = self.random.random()
        if roll < 0.15:  # gives up before the first token
            await asyncio.sleep(self.random.uniform(0.05, 0.3))
            self._hang_up(conn, "before first token")
            return
        try:
            await conn.read_head()
            if roll < 0.75:  # reads a few chunks, closes the tab
                for _ in range(self.random.randint(2, 30)):
                    if not await conn.read_some():
                        break
                if not conn.response.complete:
                    self._hang_up(conn, "mid-stream")
                    return
            await conn.read_all()
            self.stats.completed += 1
        finally:
            self._done(conn)

    async def timeout_client(self, user: str) -> None:
        c = self.config
        tokens = int(c.client_timeout_s * c.slowness * c.tokens_per_second)
        body = chat_body(user, stream=False, max_tokens=tokens)
        for attempt in range(c.retries + 1):
            if self._stop.is_set():
                return
            if attempt:
                self.stats.retries += 1
            conn = await self._request(body)
            try:
                await asyncio.wait_for(conn.read_all(), c.client_timeout_s)
            except asyncio.TimeoutError:
                self.stats.timeouts += 1
                self._hang_up(conn, "client timeout")
                continue
            finally:
                self._done(conn)
            self.stats.completed += 1
            return

    async def uploader(self, user: str) -> None:
        body = chat_body(user, stream=False, max_tokens=20, words=4000)
        conn = await self._connect()
        await conn.send_head(self.target, "POST", ROUTE, len(body))
        self.stats.sent += 1
        sent = 0
        give_up_at = self.random.uniform(0.2, 0.8) * len(body)
        try:
            while sent < give_up_at:  # a slow uplink
                if conn.writer.is_closing() or conn.reader.at_eof():
                    return  # the server answered (an error) and hung up first
                await conn.send(body[sent:sent + 1024])
                sent += 1024
                await asyncio.sleep(0.1)
            self._hang_up(conn, "during upload")
        finally:
            self._done(conn)

    async def quick(self, user: str) -> None:
        conn = await self._request(chat_body(user, stream=False, max_tokens=8))
        try:
            await conn.read_head()
            await conn.read_all()
            self.stats.completed += 1
        finally:
            self._done(conn)


async def _wait_ready(target: Target, deadline_s: float = 120.0) -> None:
    """The gateway may still be starting (compose starts everything at once)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            conn = await Connection.open(target, timeout=2.0)
            conn.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


def main(args: argparse.Namespace) -> int:
    """``otel-disconnect loadgen`` (tools/cli/loadgen.py): run until ``--duration`` or Ctrl-C."""
    config = LoadConfig(url=args.url, client_timeout_s=args.client_timeout, seed=args.seed)
    generator = LoadGenerator(config)

    async def run() -> None:
        await _wait_ready(generator.target)
        task = asyncio.create_task(generator.run(args.duration))
        while not task.done():
            await asyncio.wait({task}, timeout=10)
            print(f"loadgen: {generator.stats.line()}", flush=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"loadgen: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    return 0
