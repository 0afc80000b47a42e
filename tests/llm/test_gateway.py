"""LLM gateways: a FastAPI proxy streaming from the simulator through httpx, on real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from otel_disconnect import instrument_app
from otel_disconnect.context import current_state

from ..conftest import Telemetry
from ..servers import RawClient, serve, wait_for
from .helpers import close_to, post_json, read_tokens, server_span, simulator, token_metrics

ROUTE = "/v1/chat/completions"


def build_proxy(upstream: str, mode: str, states: dict[str, Any], telemetry: Telemetry) -> FastAPI:
    """``leaky``: a reader task drains the upstream whatever happens to the client (cancellation
    not propagated); ``propagating``: the upstream stream is closed when the response is cut."""
    app = FastAPI()
    client = httpx.AsyncClient(base_url=upstream, timeout=30)
    tasks: set[asyncio.Task[None]] = set()

    @app.post(ROUTE)
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        states[body["user"]] = current_state()  # the record: the test reads its detection time
        if mode == "propagating":
            async def relay() -> Any:
                async with client.stream("POST", ROUTE, json=body) as response:
                    async for chunk in response.aiter_raw():
                        yield chunk

            return StreamingResponse(relay(), media_type="text/event-stream")

        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def drain() -> None:
            try:
                async with client.stream("POST", ROUTE, json=body) as response:
                    async for chunk in response.aiter_raw():
                        queue.put_nowait(chunk)
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(drain())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

        async def from_queue() -> Any:
            while (chunk := await queue.get()) is not None:
                yield chunk

        return StreamingResponse(from_queue(), media_type="text/event-stream")

    return instrument_app(app, **telemetry.options())


def _body(user: str) -> dict[str, Any]:
    return {"model": "m-gw", "stream": True, "stream_options": {"include_usage": True},
            "user": user, "messages": [{"role": "user", "content": "hello there"}]}


def test_leaky_gateway_counts_what_it_reads_after_the_client_left(telemetry: Telemetry) -> None:
    states: dict[str, Any] = {}
    with simulator(ttft=0.0, tokens_per_second=40, max_tokens=60, model="m-gw",
                   keep_generating_after_disconnect=True) as (upstream, sim):
        app = build_proxy(upstream.url, "leaky", states, telemetry)
        with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
            post_json(client, ROUTE, _body("leaky"))
            received = read_tokens(client, 10)
            client.close()
            record = wait_for(lambda: (r := sim.find("leaky")) is not None and r.done and r)
            span = server_span(telemetry, ROUTE)
            # The reader task keeps counting after the request ended: through the metrics.
            wait_for(lambda: token_metrics(telemetry, ROUTE, "m-gw")["generation_after_count"] == 1)

    # The app is kept alive by the OpenTelemetry instrumentor's registry: drop the state.
    state = states.pop("leaky")
    truth_after = record.generated_after(state.detected_perf)
    assert record.generated == 60 and not record.aborted
    assert truth_after >= 30  # the upstream kept generating for nobody, and was read
    metrics = token_metrics(telemetry, ROUTE, "m-gw")
    assert metrics["total"] == 60  # the final usage chunk agrees with the chunk count
    assert close_to(metrics["after"], truth_after)
    assert close_to(metrics["undelivered"], 60 - received)
    attrs = span.attributes
    assert attrs["disconnect.detected"] is True
    assert attrs["disconnect.llm.upstream_streams_open"] == 1  # still read after the request
    assert attrs["gen_ai.usage.output_tokens"] < 60  # the span saw only tokens until the end
    # ... counted by chunks, before the usage chunk could confirm them: an estimate.
    assert attrs["disconnect.tokens_estimated"] is True


def test_propagating_gateway_reads_next_to_nothing_after(telemetry: Telemetry) -> None:
    states: dict[str, Any] = {}
    config = {"ttft": 0.0, "tokens_per_second": 40, "max_tokens": 300, "model": "m-gw"}
    with simulator(**config) as (upstream, sim):
        app = build_proxy(upstream.url, "propagating", states, telemetry)
        with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
            post_json(client, ROUTE, _body("prop"))
            received = read_tokens(client, 10)
            client.close()
            record = wait_for(lambda: (r := sim.find("prop")) is not None and r.done and r)
            span = server_span(telemetry, ROUTE)
            wait_for(lambda: token_metrics(telemetry, ROUTE, "m-gw")["total"] > 0)

    states.clear()  # the app outlives the test (the instrumentor keeps it): drop the state
    assert record.aborted and record.generated < 300  # the upstream saw its client leave
    attrs = span.attributes
    metrics = token_metrics(telemetry, ROUTE, "m-gw")
    assert attrs["disconnect.tokens_after"] <= 1
    assert "disconnect.llm.upstream_streams_open" not in attrs
    assert close_to(attrs["gen_ai.usage.output_tokens"], received, 2)
    total = attrs["gen_ai.usage.output_tokens"]
    assert close_to(attrs["disconnect.tokens_undelivered"], total - received)
    assert metrics["total"] == attrs["gen_ai.usage.output_tokens"]
    assert metrics["after"] == attrs["disconnect.tokens_after"]


def test_openai_sdk_through_the_gateway_is_counted(telemetry: Telemetry) -> None:
    openai = pytest.importorskip("openai")
    app = FastAPI()

    @app.post("/ask")
    async def ask(request: Request) -> dict[str, Any]:
        sdk = openai.AsyncOpenAI(base_url=request.headers["x-upstream"] + "/v1", api_key="sim")
        stream = await sdk.chat.completions.create(
            model="m-sdk", messages=[{"role": "user", "content": "hi"}], stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        reply = await sdk.completions.create(model="m-sdk", prompt="hi", max_tokens=7)
        await sdk.close()
        return {"text": text, "second": reply.choices[0].text}

    instrument_app(app, **telemetry.options())
    config = {"ttft": 0.0, "tokens_per_second": 2000, "max_tokens": 25, "model": "m-sdk"}
    with simulator(**config) as (upstream, _), serve(app, "uvicorn-h11") as server:
        response = httpx.post(server.url + "/ask", headers={"x-upstream": upstream.url})
        assert response.status_code == 200
        span = server_span(telemetry, "/ask")
    assert span.attributes["gen_ai.usage.output_tokens"] == 25 + 7
    assert token_metrics(telemetry, "/ask", "m-sdk")["total"] == 32
