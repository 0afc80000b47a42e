"""The benchmarked app, one variant per server process, chosen by ``BENCH_VARIANT``.

Servers serve ``served:app`` (``bench/`` on ``PYTHONPATH``), so importing this module builds
nothing. The variants:

- ``bare``: FastAPI, no instrumentation;
- ``otel``: ``FastAPIInstrumentor.instrument_app`` with an SDK TracerProvider whose
  BatchSpanProcessor (the production processor) exports to an exporter that drops the spans;
- ``otel+disconnect``: the same plus ``otel_disconnect.instrument_app(app, metrics_path=None)``;
- ``otel+disconnect+sdkmetrics``: the same with ``metrics="opentelemetry"``, the OpenTelemetry
  sink, on an SDK MeterProvider with an in-memory reader (collects only when asked);
- ``otel+naive``: the same as ``otel`` plus a one-reader-task-per-request middleware;
- ``disconnect`` (not in the default set): ``bare`` plus ``DisconnectMiddleware`` alone, no
  OpenTelemetry, so the middleware's own cost is not diluted by the SDK's;
- ``disconnect-nocount``, ``otel+disconnect-nocount`` (not in the default set): the same with
  ``count_tokens="off"``: the middleware passing a stream through without counting its tokens,
  the baseline the cost of counting is measured against;
- ``disconnect-fleet`` (not in the default set): ``disconnect`` on the fleet channel, on the Redis
  at ``BENCH_REDIS_URL`` (instructions.py starts one): what the channel adds per request.

Routes: ``/hello`` (small JSON), ``/stream`` (10 small SSE events that are not completion chunks),
``/chat`` (an OpenAI chat-completion stream: 10 ``chat.completion.chunk`` events of one token
each, or ``?chunks=N``, and ``data: [DONE]``, what LLM services stream), ``/wait`` + ``/started`` +
``/result`` (detection latency, variants with otel-disconnect only), ``/_bench/gc-off`` (the
cycle collector off, for the per-chunk measurement) and ``/_bench/stats``
(process CPU time and garbage-collector totals, read by the orchestrator around each load phase).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

VARIANTS = ("bare", "otel", "otel+disconnect", "otel+disconnect+sdkmetrics", "otel+naive")
ALL_VARIANTS = (
    *VARIANTS, "disconnect", "disconnect-nocount", "otel+disconnect-nocount", "disconnect-fleet"
)
# What overhead.py and micro.py run unless told: the sink comparison is instructions.py's.
DEFAULT_VARIANTS = ("bare", "otel", "otel+disconnect", "otel+naive")
STREAM_CHUNKS = 10
WAIT_S = 10.0

_gc_totals = {"collected": 0, "collections": 0, "pause_s": 0.0}
# Requests the benchmarked routes handled, counted in the handlers (no extra layer): CPU time
# over a phase is divided by what the server did, not by what the load generator saw complete
# (those differ by the requests in flight at the phase's ends, more for the slower variant).
_handled = {"requests": 0}
_gc_clock = [0.0]  # perf_counter() at the start of the running collection


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    # Objects the cycle collector frees are reference cycles the request path left behind; the
    # time it spends is the pause that shows up in the p99 tail (README: Performance).
    if phase == "start":
        _gc_clock[0] = time.perf_counter()
        return
    _gc_totals["collected"] += info.get("collected", 0)
    _gc_totals["collections"] += 1
    _gc_totals["pause_s"] += time.perf_counter() - _gc_clock[0]


class _DropSpans:
    """A SpanExporter that drops every span: the cost measured is the SDK's, not a backend's."""

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _tracer_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    if os.environ.get("BENCH_SPAN_PROCESSOR") == "simple":
        # Spans exported in the request's own thread: no worker thread whose wake-ups (timed,
        # so different in every run under valgrind) move a run by a few million instructions.
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider.add_span_processor(SimpleSpanProcessor(_DropSpans()))  # type: ignore[arg-type]
    else:
        provider.add_span_processor(BatchSpanProcessor(_DropSpans()))  # type: ignore[arg-type]
    return provider


async def _chunks() -> AsyncIterator[bytes]:
    for i in range(STREAM_CHUNKS):
        yield b'data: {"token": %d}\n\n' % i


def _chat_chunk(i: int) -> bytes:
    # What vLLM's OpenAI server writes for one token (its field order, one event per body chunk).
    return (
        b'data: {"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk",'
        b'"created":1764547200,"model":"bench-model","choices":[{"index":0,'
        b'"delta":{"content":" tok%d"},"logprobs":null,"finish_reason":null}]}\n\n' % i
    )


_CHAT = [_chat_chunk(i) for i in range(STREAM_CHUNKS)]
MAX_CHAT_CHUNKS = 10_000
_chat_streams: dict[int, list[bytes]] = {STREAM_CHUNKS: _CHAT}


def _chat_stream(query: bytes) -> list[bytes]:
    """The token chunks of ``/chat``: ``STREAM_CHUNKS``, or ``?chunks=N``. Built once per length,
    so that a longer stream costs the app nothing per chunk beyond yielding it."""
    chunks = STREAM_CHUNKS
    if query.startswith(b"chunks="):
        chunks = max(0, min(MAX_CHAT_CHUNKS, int(query[7:].split(b"&", 1)[0])))
    found = _chat_streams.get(chunks)
    if found is None:
        found = _chat_streams[chunks] = [_chat_chunk(i) for i in range(chunks)]
    return found


async def _chat_chunks(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
    yield b"data: [DONE]\n\n"


def create_app(variant: str) -> FastAPI:
    if variant not in ALL_VARIANTS:
        raise ValueError(f"BENCH_VARIANT must be one of {ALL_VARIANTS}, got {variant!r}")
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        _handled["requests"] += 1
        return {"message": "hello"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        _handled["requests"] += 1
        return StreamingResponse(_chunks(), media_type="text/event-stream")

    @app.get("/chat")
    async def chat(request: Request) -> StreamingResponse:
        # The query is read raw, not as a FastAPI parameter: /chat without one costs what it did.
        _handled["requests"] += 1
        chunks = _chat_stream(request.scope.get("query_string", b""))
        return StreamingResponse(_chat_chunks(chunks), media_type="text/event-stream")

    @app.get("/_bench/stats")
    async def stats() -> dict[str, Any]:
        module = sys.modules.get("otel_disconnect")  # which checkout's code is measured
        return {"cpu_s": time.process_time(), "pid": os.getpid(), **_gc_totals, **_handled,
                "otel_disconnect": getattr(module, "__file__", None)}

    @app.get("/_bench/gc-off")
    async def gc_off() -> dict[str, Any]:
        # The per-chunk measurement's: a full collection landing in one of its two runs and not
        # the other moves that run by tens of millions of instructions (OpenTelemetry makes a
        # few dozen objects per chunk), far more than the difference being measured.
        gc.collect()
        gc.disable()
        return {}

    count_tokens = "off" if variant.endswith("-nocount") else "auto"
    if variant.startswith("disconnect"):
        from otel_disconnect import DisconnectMiddleware

        fleet = {"redis_url": os.environ["BENCH_REDIS_URL"]} if variant.endswith("-fleet") else {}
        app.add_middleware(DisconnectMiddleware, count_tokens=count_tokens, **fleet)
    elif variant != "bare":
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, tracer_provider=_tracer_provider())
    if variant.startswith("otel+disconnect"):
        import otel_disconnect

        otel_disconnect.instrument_app(app, metrics_path=None, count_tokens=count_tokens)
        _detection_routes(app)
    elif variant == "otel+disconnect+sdkmetrics":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        import otel_disconnect

        provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        otel_disconnect.instrument_app(
            app, metrics_path=None, metrics="opentelemetry", meter_provider=provider
        )
        _detection_routes(app)
    elif variant == "otel+naive":
        from naive import NaiveDisconnectMiddleware

        app.add_middleware(NaiveDisconnectMiddleware)
    return app


class _Trial:
    __slots__ = ("disconnected_at", "done", "started")

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.done = asyncio.Event()
        self.disconnected_at: float | None = None


def _detection_routes(app: FastAPI) -> None:
    """``GET /wait?id=`` waits for its client to leave without ever calling receive();
    ``/started?id=`` returns once that handler runs; ``/result?id=`` returns the detection time."""
    import otel_disconnect

    trials: dict[str, _Trial] = {}

    def trial(key: str) -> _Trial:
        found = trials.get(key)
        if found is None:
            found = trials[key] = _Trial()
        return found

    @app.get("/wait")
    async def wait(id: str) -> dict[str, Any]:
        t = trial(id)
        state = otel_disconnect.current()
        t.started.set()
        try:
            if state is not None:
                await asyncio.wait_for(state.wait_disconnected(), WAIT_S)
                t.disconnected_at = state.disconnected_at
        except asyncio.TimeoutError:
            pass
        finally:
            t.done.set()
        return {"disconnected_at": t.disconnected_at}

    @app.get("/started")
    async def started(id: str) -> dict[str, bool]:
        await asyncio.wait_for(trial(id).started.wait(), WAIT_S)
        return {"started": True}

    @app.get("/result")
    async def result(id: str) -> dict[str, Any]:
        t = trial(id)
        try:
            await asyncio.wait_for(t.done.wait(), WAIT_S)
        finally:
            trials.pop(id, None)
        return {"disconnected_at": t.disconnected_at}


def server_app() -> FastAPI:
    """The app a benchmark server serves (through served.py): the variant ``BENCH_VARIANT``
    names, with the GC accounting ``/_bench/stats`` reports."""
    app = create_app(os.environ.get("BENCH_VARIANT", "bare"))
    gc.callbacks.append(_on_gc)
    return app
