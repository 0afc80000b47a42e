"""record_tokens() from a producer task that outlives its request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from otel_disconnect import current, instrument_app
from otel_disconnect.context import current_state
from otel_disconnect.llm import record_tokens

from ..conftest import Telemetry
from ..servers import RawClient, serve, wait_for
from .helpers import close_to, server_span, token_metrics

N = 120


def build_app(states: dict[str, Any], times: list[float], telemetry: Telemetry) -> FastAPI:
    app = FastAPI()
    tasks: set[asyncio.Task[None]] = set()

    @app.get("/produce")
    async def produce() -> StreamingResponse:
        states["state"] = current_state()  # the record: the test reads its detection time
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        async def producer() -> None:
            # Feeds the queue at 200 tokens/s and does not stop when nobody reads it.
            start = time.perf_counter()
            for i in range(N):
                await asyncio.sleep(max(0.0, start + i / 200 - time.perf_counter()))
                times.append(time.perf_counter())
                record_tokens(1, model="m-prod")
                queue.put_nowait(f"tok{i} ")
            queue.put_nowait(None)

        task = asyncio.create_task(producer())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

        async def body() -> Any:
            while (piece := await queue.get()) is not None:
                yield piece

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/outside")
    async def outside() -> dict[str, bool]:
        return {"ok": True}

    return instrument_app(app, **telemetry.options())


def test_producer_keeps_counting_after_the_request_ended(telemetry: Telemetry) -> None:
    states: dict[str, Any] = {}
    times: list[float] = []
    app = build_app(states, times, telemetry)
    with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
        client.request("GET", "/produce")
        client.read_until(b"tok9 ")
        client.close()
        span = server_span(telemetry, "/produce")
        wait_for(lambda: token_metrics(telemetry, "/produce", "m-prod")["generation_after_count"])

    state = states.pop("state")  # the app outlives the test (the instrumentor keeps it)
    truth_after = sum(1 for t in times if t > state.detected_perf)
    assert len(times) == N and truth_after > 50
    metrics = token_metrics(telemetry, "/produce", "m-prod")
    assert metrics["total"] == N
    assert close_to(metrics["after"], truth_after)
    # text/plain cannot be parsed: what was produced before detection counts as delivered.
    assert metrics["undelivered"] == metrics["after"]
    # The span ended with the request: it holds only the tokens counted until then.
    assert span.attributes["gen_ai.usage.output_tokens"] < N
    seconds = telemetry.value(
        "otel_disconnect_llm_generation_after_disconnect_seconds_sum", route="/produce",
        model="m-prod",
    )
    assert seconds == pytest.approx(times[-1] - state.detected_perf, abs=0.05)


def test_record_tokens_outside_a_request_is_a_no_op() -> None:
    record_tokens(5)  # must not raise
    assert current() is None
