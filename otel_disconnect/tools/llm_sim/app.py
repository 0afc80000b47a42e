"""The simulator's HTTP API: OpenAI-compatible completions plus ``/metrics`` and ground truth.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming and not,
``stream_options.include_usage``), ``GET /v1/models``, ``GET /metrics`` (vLLM names),
``GET /sim/requests`` (ground truth per request), ``GET /health``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from otel_disconnect.tools.llm_sim.engine import Generation, SimConfig, Simulator


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _prompt_tokens(body: dict[str, Any]) -> int:
    """Whitespace-separated words of the prompt: deterministic, good enough for a simulator."""
    parts: list[str] = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts.extend(p for p in prompt if isinstance(p, str))
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
    return max(1, sum(len(p.split()) for p in parts))


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Completion:
    """The OpenAI response shapes of one request (chat or text completion)."""

    def __init__(self, chat: bool, generation: Generation, model: str) -> None:
        self.chat = chat
        self.generation = generation
        self.model = model
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.generation.record.id, "object": obj, "created": self.created,
                "model": self.model}

    def usage(self) -> dict[str, int]:
        record = self.generation.record
        return {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.generated,
                "total_tokens": record.prompt_tokens + record.generated}

    def chunk(self, text: str | None, finish_reason: str | None, with_usage: bool) -> str:
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if text == "":
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta}
            obj = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or ""}
            obj = self._base("text_completion")
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        obj["choices"] = [choice]
        if with_usage:
            obj["usage"] = None
        return f"data: {_dumps(obj)}\n\n"

    def usage_chunk(self) -> str:
        obj = self._base("chat.completion.chunk" if self.chat else "text_completion")
        obj["choices"] = []
        obj["usage"] = self.usage()
        return f"data: {_dumps(obj)}\n\n"

    def full(self, text: str) -> dict[str, Any]:
        reason = self.generation.record.finished_reason
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": reason,
            }
            obj = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = self._base("text_completion")
        obj["choices"] = [choice]
        obj["usage"] = self.usage()
        return obj


async def _stream(
    sim: Simulator, completion: _Completion, include_usage: bool
) -> AsyncIterator[str]:
    generation = completion.generation
    try:
        if completion.chat:
            yield completion.chunk("", None, include_usage)
        while (text := await generation.queue.get()) is not None:
            yield completion.chunk(text, None, include_usage)
        if generation.record.aborted:
            return
        yield completion.chunk(None, generation.record.finished_reason, include_usage)
        if include_usage:
            yield completion.usage_chunk()
        yield "data: [DONE]\n\n"
    finally:
        # Cancelled by the server or framework at a disconnect, or closed early.
        sim.client_left(generation)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(sim: Simulator, request: Request, generation: Generation) -> str | None:
    """The full text, or None when the client left first (vLLM's ``with_cancellation`` idea)."""
    text: list[str] = []

    async def read() -> None:
        while (piece := await generation.queue.get()) is not None:
            text.append(piece)

    reader = asyncio.ensure_future(read())
    listener = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((reader, listener), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, listener):
            task.cancel()
    if not reader.done() or reader.cancelled():
        sim.client_left(generation)
        return None
    return "".join(text)


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}},
                        status_code=status)


def create_app(config: SimConfig | None = None, simulator: Simulator | None = None, *,
               instrument: bool = False) -> Starlette:
    """The simulator app; ``app.state.sim`` is the :class:`Simulator` (ground truth, metrics).

    ``instrument=True`` adds ``DisconnectMiddleware`` the way ``vllm serve --middleware`` does
    (``app.add_middleware(cls)``, default options, so its metrics go to the global registry).
    """
    sim = simulator or Simulator(config)

    async def completions(request: Request, chat: bool) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error("invalid JSON body")
        if not isinstance(body, dict):
            return _error("expected a JSON object")
        if chat and not isinstance(body.get("messages"), list):
            return _error("'messages' is required")
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        user = body.get("user") if isinstance(body.get("user"), str) else None
        generation = sim.start(prompt_tokens=_prompt_tokens(body), max_tokens=_max_tokens(body),
                               stream=stream, user=user, prefix="chatcmpl" if chat else "cmpl")
        requested = body.get("model")
        model = requested if isinstance(requested, str) and requested else sim.config.model
        completion = _Completion(chat, generation, model)
        if stream:
            return StreamingResponse(_stream(sim, completion, include_usage),
                                     media_type="text/event-stream")
        text = await _collect(sim, request, generation)
        if text is None:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        return JSONResponse(completion.full(text))

    async def chat_completions(request: Request) -> Response:
        return await completions(request, chat=True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, chat=False)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": sim.config.model, "object": "model", "created": 0, "owned_by": "otel-disconnect"}
        ]})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(sim.registry), media_type=CONTENT_TYPE_LATEST)

    async def ground_truth(request: Request) -> Response:
        return JSONResponse({"requests": [r.as_dict() for r in sim.records]})

    async def health(request: Request) -> Response:
        return Response()

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/sim/requests", ground_truth),
        Route("/health", health),
    ])
    app.state.sim = sim
    if instrument:
        from otel_disconnect.middleware import DisconnectMiddleware

        app.add_middleware(DisconnectMiddleware)  # type: ignore[arg-type]
    return app
