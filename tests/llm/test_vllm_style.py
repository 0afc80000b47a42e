"""An app built the way vLLM's API server builds its own: handlers under ``with_cancellation``,
the middleware added with ``app.add_middleware`` (what ``--middleware`` does)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from otel_disconnect import DisconnectMiddleware
from otel_disconnect.llm import record_tokens
from otel_disconnect.tools.llm_sim import Generation, SimConfig, Simulator

from ..conftest import Telemetry
from ..servers import RawClient, serve, wait_for
from .helpers import close_to, post_json, read_tokens, token_metrics

ROUTE = "/v1/chat/completions"


async def listen_for_disconnect(request: Request) -> None:
    """As vLLM's: consume messages until ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            break


def with_cancellation(handler_func: Any) -> Any:
    """As vLLM's (``vllm/entrypoints/serve/utils/api_utils.py`` in 0.33): race the handler
    against a disconnect listener, cancel the loser, and answer an empty ``Response()`` when the
    client won (it skips response-model validation). The real one runs in tests/engines."""

    @functools.wraps(handler_func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        request = args[1] if len(args) > 1 else kwargs["raw_request"]
        handler_task = asyncio.create_task(handler_func(*args, **kwargs))
        cancellation_task = asyncio.create_task(listen_for_disconnect(request))
        done, pending = await asyncio.wait(
            [handler_task, cancellation_task], return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if handler_task in done:
            return handler_task.result()
        return Response()

    return wrapper


class ChatRequest(BaseModel):
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


def _chunk(generation: Generation, model: str, delta: dict[str, Any], finish: str | None) -> str:
    obj = {"id": generation.record.id, "object": "chat.completion.chunk", "created": 0,
           "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(obj)}\n\n"


def build_vllm_like(engine: Simulator, telemetry: Telemetry) -> FastAPI:
    router = APIRouter()

    @router.post(ROUTE)
    @with_cancellation
    async def create_chat_completion(request: ChatRequest, raw_request: Request) -> Any:
        generation = engine.start(prompt_tokens=3, max_tokens=None, stream=request.stream,
                                  user=request.user, prefix="chatcmpl")
        if request.stream:
            async def stream() -> Any:
                try:
                    role = {"role": "assistant", "content": ""}
                    yield _chunk(generation, request.model, role, None)
                    while (text := await generation.queue.get()) is not None:
                        yield _chunk(generation, request.model, {"content": text}, None)
                    yield _chunk(generation, request.model, {}, "stop")
                    yield "data: [DONE]\n\n"
                finally:
                    engine.client_left(generation)  # vLLM aborts the request in its generator

            return StreamingResponse(stream(), media_type="text/event-stream")
        try:
            text = []
            while (piece := await generation.queue.get()) is not None:
                text.append(piece)
        except asyncio.CancelledError:
            engine.client_left(generation)
            raise
        record = generation.record
        return JSONResponse({
            "id": record.id, "object": "chat.completion", "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": record.finished_reason}],
            "usage": {"prompt_tokens": 3, "completion_tokens": record.generated,
                      "total_tokens": 3 + record.generated},
        })

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(DisconnectMiddleware, registry=telemetry.registry)
    return app


def _request(user: str, stream: bool) -> dict[str, Any]:
    return {"model": "m-vllm", "stream": stream, "user": user,
            "messages": [{"role": "user", "content": "hi"}]}


def _disconnects(telemetry: Telemetry, phase: str, outcome: str) -> float:
    return telemetry.value("otel_disconnect_client_disconnects_total", route=ROUTE, method="POST",
                           phase=phase, outcome=outcome)


def _all_disconnects(telemetry: Telemetry) -> float:
    return sum(
        _disconnects(telemetry, phase, outcome)
        for phase in ("request_body", "before_response", "streaming")
        for outcome in ("completed", "cancelled", "error")
    )


def test_streaming_cut_short(telemetry: Telemetry) -> None:
    engine = Simulator(SimConfig(ttft=0.0, tokens_per_second=40, max_tokens=400,
                                 record_tokens=False))
    with serve(build_vllm_like(engine, telemetry), "uvicorn-httptools") as server, \
            RawClient(server.port) as client:
        post_json(client, ROUTE, _request("s", stream=True))
        received = read_tokens(client, 8)
        client.close()
        record = wait_for(lambda: (r := engine.find("s")) is not None and r.done and r)
        wait_for(lambda: _all_disconnects(telemetry) == 1)

    assert _disconnects(telemetry, "streaming", "cancelled") == 1
    assert record.aborted
    metrics = token_metrics(telemetry, ROUTE, "m-vllm")
    assert close_to(metrics["total"], record.generated)
    assert metrics["after"] <= 1
    assert close_to(metrics["undelivered"], record.generated - received)
    assert metrics["generation_after_count"] == 1


def test_non_streaming_completed_and_cancelled(telemetry: Telemetry) -> None:
    engine = Simulator(SimConfig(ttft=0.0, tokens_per_second=1000, max_tokens=40,
                                 record_tokens=False))
    app = build_vllm_like(engine, telemetry)
    with serve(app, "uvicorn-httptools") as server:
        with RawClient(server.port) as client:
            post_json(client, ROUTE, _request("done", stream=False))
            client.read_until(b'"total_tokens"')
        wait_for(lambda: token_metrics(telemetry, ROUTE, "m-vllm")["total"] == 40)
        slow = Simulator(SimConfig(ttft=0.0, tokens_per_second=20, max_tokens=400,
                                   record_tokens=False))
        engine.config = slow.config  # the next request generates slowly
        with RawClient(server.port) as client:
            post_json(client, ROUTE, _request("gone", stream=False))
            wait_for(lambda: (r := engine.find("gone")) is not None and r.generated >= 3)
            client.close()
            record = wait_for(lambda: (r := engine.find("gone")) is not None and r.done and r)
        wait_for(lambda: _all_disconnects(telemetry) == 1)

    # The handler was cancelled and vLLM answered an empty Response(): the work stopped.
    assert _disconnects(telemetry, "before_response", "cancelled") == 1
    # with_cancellation cancelled the handler and the engine aborted: the tokens it generated
    # never left the engine, so the middleware (which sees HTTP only) counts none of them.
    assert record.aborted and record.generated < 400
    metrics = token_metrics(telemetry, ROUTE, "m-vllm")
    assert metrics["total"] == 40 and metrics["after"] == 0 and metrics["undelivered"] == 0


def test_producer_whose_first_token_comes_after_the_request_ended(telemetry: Telemetry) -> None:
    """A cancelled handler leaves a producer running: its tokens still reach the metrics of the
    middleware's registry, as after-disconnect and undelivered."""
    app = FastAPI()
    tasks: set[asyncio.Task[None]] = set()
    started: list[float] = []

    @app.post("/late")
    @with_cancellation
    async def late(body: dict[str, Any], raw_request: Request) -> Any:
        finished = asyncio.Event()

        async def producer() -> None:
            await asyncio.sleep(0.3)  # time to first token, longer than the client waits
            for _ in range(20):
                record_tokens(1, model="m-late")
                await asyncio.sleep(0.001)
            finished.set()

        task = asyncio.create_task(producer())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        started.append(time.perf_counter())
        await finished.wait()  # cancelling the handler does not cancel the producer
        return {"ok": "yes"}

    app.add_middleware(DisconnectMiddleware, registry=telemetry.registry)
    with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
        post_json(client, "/late", {})
        wait_for(lambda: started)
        client.close()
        wait_for(lambda: token_metrics(telemetry, "/late", "m-late")["generation_after_count"])

    metrics = token_metrics(telemetry, "/late", "m-late")
    assert metrics == {"total": 20, "after": 20, "undelivered": 20, "generation_after_count": 1}
    # with_cancellation answered its empty Response() for the cancelled handler.
    outcome = {"route": "/late", "method": "POST", "phase": "before_response"}
    assert telemetry.value("otel_disconnect_client_disconnects_total", **outcome,
                           outcome="cancelled") == 1
