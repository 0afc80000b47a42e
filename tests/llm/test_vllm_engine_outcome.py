"""The outcome of a non-streaming vLLM request whose client left, whatever placeholder vLLM's
``with_cancellation`` answers: 0.33 an empty ``Response()``, 0.13 ``None`` (FastAPI sends the
JSON ``null``, 4 bytes, before the cancelled handler has aborted its engine request). The engine
request is tied through the engine source's wrappers on a stand-in ``OutputProcessor`` (vLLM's
method names); the real servers of both releases run in tests/engines/test_vllm.py."""

from __future__ import annotations

import asyncio
import functools
import types
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from otel_disconnect import DisconnectMiddleware
from otel_disconnect.llm import vllm_engine

from ..conftest import Telemetry
from ..servers import RawClient, serve, wait_for
from .helpers import post_json


class _Processor:
    """vLLM 0.33's ``OutputProcessor`` methods, doing nothing (wrapped by the engine source)."""

    def add_request(self, request: Any, prompt: Any, parent_req: Any = None,
                    request_index: int = 0, queue: Any = None) -> None:
        return None

    def process_outputs(self, engine_core_outputs: Any, engine_core_timestamp: Any = None,
                        iteration_stats: Any = None, weight_version: Any = None) -> Any:
        return None

    def abort_requests(self, request_ids: Any, internal: bool) -> list[str]:
        return list(request_ids)


class _Output:
    def __init__(self, request_id: str, tokens: int, finish: Any = None) -> None:
        self.request_id = request_id
        self.new_token_ids = list(range(tokens))
        self.finish_reason = finish


def _with_cancellation(placeholder: Any) -> Any:
    """vLLM's decorator: race the handler against the disconnect, cancel the loser, answer
    ``placeholder`` when the client won."""

    def decorate(handler: Any) -> Any:
        @functools.wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            request: Request = kwargs["raw_request"]

            async def listen() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass

            handler_task = asyncio.create_task(handler(*args, **kwargs))
            listener = asyncio.create_task(listen())
            done, pending = await asyncio.wait(
                [handler_task, listener], return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if handler_task in done:
                return handler_task.result()
            return placeholder()

        return wrapper

    return decorate


def _app(telemetry: Telemetry, placeholder: Any, finish_first: bool) -> tuple[FastAPI, list[str]]:
    cls = type("OutputProcessor", (_Processor,), {})
    vllm_engine._patch_output_processor(cls)
    processor = cls()
    started: list[str] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    @_with_cancellation(placeholder)
    async def chat(body: dict[str, Any], raw_request: Request) -> Any:
        request_id = f"chatcmpl-{body['id']}"
        processor.add_request(types.SimpleNamespace(request_id=request_id), None)
        processor.process_outputs([_Output(request_id, 2)])
        started.append(request_id)
        try:
            if finish_first:
                processor.process_outputs([_Output(request_id, 1, finish="length")])
                await asyncio.sleep(3600)  # the answer is ready; the client leaves first
            await asyncio.sleep(3600)  # the engine generates, for longer than the client waits
        except asyncio.CancelledError:
            processor.abort_requests([request_id], internal=True)  # AsyncLLM.generate's abort
            raise
        return {"never": "sent"}

    app.add_middleware(DisconnectMiddleware, registry=telemetry.registry)
    return app, started


def _counted(telemetry: Telemetry, outcome: str) -> float:
    """Disconnects before the response on the chat route, with ``outcome``."""
    return telemetry.value(
        "otel_disconnect_client_disconnects_total",
        route="/v1/chat/completions",
        method="POST",
        phase="before_response",
        outcome=outcome,
    )


def _ended(telemetry: Telemetry) -> float:
    return sum(_counted(telemetry, o) for o in ("completed", "cancelled", "error"))


@pytest.mark.parametrize(
    ("release", "placeholder"), [("0.33", Response), ("0.13", lambda: None)]
)
def test_non_streaming_client_that_left_is_cancelled(
    telemetry: Telemetry, release: str, placeholder: Any
) -> None:
    app, started = _app(telemetry, placeholder, finish_first=False)
    try:
        with serve(app, "uvicorn-h11") as server:
            with RawClient(server.port) as client:
                post_json(client, "/v1/chat/completions", {"id": release})
                wait_for(lambda: started)
                client.close()

            wait_for(lambda: _ended(telemetry))
            wait_for(lambda: f"chatcmpl-{release}" not in vllm_engine._live)
        assert _counted(telemetry, "cancelled") == 1, release
        assert _counted(telemetry, "completed") == 0
    finally:
        vllm_engine._live.clear()


def test_engine_request_that_had_finished_says_nothing(telemetry: Telemetry) -> None:
    """A handler whose engine request had finished and that answers something non-empty after
    the client left is judged by what it sent, as before: ``completed``."""
    app, started = _app(telemetry, lambda: {"answer": "for nobody"}, finish_first=True)
    try:
        with serve(app, "uvicorn-h11") as server:
            with RawClient(server.port) as client:
                post_json(client, "/v1/chat/completions", {"id": "done"})
                wait_for(lambda: started)
                client.close()

            wait_for(lambda: _ended(telemetry))
        assert _counted(telemetry, "completed") == 1
    finally:
        vllm_engine._live.clear()
