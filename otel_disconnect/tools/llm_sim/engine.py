"""The simulated engine: a batch with a fixed number of slots, deterministic tokens at a fixed
rate, and a ground-truth record per request (tokens generated, when, and whether the client
was still there) that tests compare the instrumentation against.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from otel_disconnect.llm.tokens import record_tokens
from otel_disconnect.tools.llm_sim.metrics import SimMetrics

MAX_RECORDS = 10_000
MAX_TOKEN_TIMES = 100_000


@dataclass(frozen=True)
class SimConfig:
    model: str = "sim-model"
    ttft: float = 0.2  # seconds from admission to the first token
    tokens_per_second: float = 50.0
    max_tokens: int = 128  # a response's natural length; a smaller request max_tokens cuts it
    max_num_seqs: int = 256  # requests generating at once; the rest wait
    kv_cache_tokens: int = 65_536
    keep_generating_after_disconnect: bool = False
    # Count each generated token with record_tokens(), as an engine integration would: with the
    # middleware in front, tokens generated for a client that left are counted exactly.
    record_tokens: bool = True
    idle_watts: float = 70.0
    watts_per_request: float = 25.0
    max_watts: float = 400.0

    def __post_init__(self) -> None:
        if self.tokens_per_second <= 0:
            raise ValueError("tokens_per_second must be > 0")
        if self.ttft < 0 or self.max_tokens < 0 or self.max_num_seqs < 1:
            raise ValueError("ttft and max_tokens must be >= 0, max_num_seqs >= 1")


@dataclass
class Record:
    """Ground truth for one request. Times are ``time.perf_counter()`` values."""

    id: str
    stream: bool
    user: str | None
    prompt_tokens: int
    started: float
    token_times: list[float] = field(default_factory=list)
    generated: int = 0
    client_disconnected_at: float | None = None
    finished_reason: str | None = None
    finished_at: float | None = None

    @property
    def aborted(self) -> bool:
        return self.finished_reason == "abort"

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def generated_after(self, t: float) -> int:
        """Tokens generated after perf_counter time ``t``."""
        return sum(1 for x in self.token_times if x > t)

    @property
    def generated_after_disconnect(self) -> int:
        left = self.client_disconnected_at
        return 0 if left is None else self.generated_after(left)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "stream": self.stream, "user": self.user,
            "prompt_tokens": self.prompt_tokens, "generated": self.generated,
            "generated_after_disconnect": self.generated_after_disconnect,
            "client_disconnected": self.client_disconnected_at is not None,
            "aborted": self.aborted, "finished_reason": self.finished_reason, "done": self.done,
        }


class Generation:
    """One request's generation task and the queue its response reads tokens from."""

    def __init__(self, record: Record, n: int, reason: str) -> None:
        self.record = record
        self.n = n
        self.reason = reason
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None


class Simulator:
    def __init__(self, config: SimConfig | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config or SimConfig()
        self.registry = registry if registry is not None else CollectorRegistry()
        c = self.config
        self.metrics = SimMetrics(self.registry, c.model, idle_watts=c.idle_watts,
                                  watts_per_request=c.watts_per_request, max_watts=c.max_watts)
        self.records: deque[Record] = deque(maxlen=MAX_RECORDS)
        self._ids = itertools.count()
        self._slots: asyncio.Semaphore | None = None
        self.running = 0
        self.waiting = 0
        self.kv_tokens = 0

    # -- ground truth --------------------------------------------------------------------------

    def find(self, user: str) -> Record | None:
        for record in reversed(self.records):
            if record.user == user:
                return record
        return None

    # -- generation ----------------------------------------------------------------------------

    def start(self, *, prompt_tokens: int, max_tokens: int | None, stream: bool,
              user: str | None, prefix: str) -> Generation:
        natural = self.config.max_tokens
        n = natural if max_tokens is None else max(0, min(natural, max_tokens))
        reason = "length" if max_tokens is not None and max_tokens < natural else "stop"
        record = Record(f"{prefix}-sim-{next(self._ids)}", stream, user, prompt_tokens,
                        time.perf_counter())
        self.records.append(record)
        generation = Generation(record, n, reason)
        generation.task = asyncio.create_task(self._generate(generation))
        return generation

    def client_left(self, generation: Generation) -> None:
        """The client of ``generation`` went away: abort, unless configured to keep going."""
        record = generation.record
        if record.done or record.client_disconnected_at is not None:
            return
        record.client_disconnected_at = time.perf_counter()
        if not self.config.keep_generating_after_disconnect and generation.task is not None:
            generation.task.cancel()

    def _load(self) -> None:
        self.metrics.load(self.running, self.waiting, self.kv_tokens / self.config.kv_cache_tokens)

    async def _generate(self, generation: Generation) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_num_seqs)
        record, m = generation.record, self.metrics
        m.prompt_tokens.inc(record.prompt_tokens)
        self.waiting += 1
        self._load()
        admitted = False
        reason = "abort"
        try:
            async with self._slots:
                self.waiting -= 1
                admitted = True
                self.running += 1
                self.kv_tokens += record.prompt_tokens
                self._load()
                try:
                    reason = await self._tokens(generation)
                finally:
                    self.running -= 1
                    self.kv_tokens -= record.prompt_tokens + record.generated
                    self._load()
        finally:
            if not admitted:
                self.waiting -= 1
                self._load()
            record.finished_reason = reason
            record.finished_at = time.perf_counter()
            m.success[reason].inc()
            m.e2e_latency.observe(record.finished_at - record.started)
            generation.queue.put_nowait(None)

    async def _tokens(self, generation: Generation) -> str:
        record, c = generation.record, self.config
        loop = asyncio.get_running_loop()
        first = loop.time() + c.ttft
        interval = 1.0 / c.tokens_per_second
        for i in range(generation.n):
            # Absolute deadlines: the rate does not drift with scheduling delays.
            delay = first + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            if i == 0:
                self.metrics.ttft.observe(now - record.started)
            if len(record.token_times) < MAX_TOKEN_TIMES:
                record.token_times.append(now)
            record.generated += 1
            self.kv_tokens += 1
            self.metrics.generation_tokens.inc()
            self._load()
            if c.record_tokens:
                record_tokens(1, model=c.model)
            generation.queue.put_nowait(f"tok{i} ")
        return generation.reason
