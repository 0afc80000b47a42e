"""A vLLM OpenAI-style server with a fake engine core, run in the vLLM environment (.matrix/).

Real vLLM code: its argument parser (``--middleware``), ``init_entrypoints_middleware`` (what
``build_app`` calls to add the middlewares), ``with_cancellation``, ``AsyncLLM.generate`` and
``AsyncLLM.abort``, the ``OutputProcessor`` and ``RequestOutputCollector``. Fake: the engine core
(no model, no GPU), which emits ``EngineCoreOutput``s with ``TOKENS_PER_STEP`` token ids every
``STEP_S`` seconds after ``QUEUE_S`` in the queue, and records its ground truth (tokens, their
times, the abort), served at ``GET /truth``.

    python tests/engines/vllm_server.py PORT TOKENS_PER_STEP STEP_S QUEUE_S MAX_TOKENS [--plain]

``--plain`` leaves the middleware out (the byte-identity check).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

# No GPU here: vLLM's CPU platform, so that its argument parser can infer a device.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.common.cli_args import make_arg_parser
from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

MODEL = "fake-vllm"


class Truth:
    def __init__(self) -> None:
        self.requests: dict[str, dict[str, Any]] = {}


class FakeCore:
    """The engine core's place: steps requests, honours aborts, records what it did."""

    def __init__(
        self,
        owner: FakeEngine,
        tokens_per_step: int,
        step_s: float,
        queue_s: float,
        max_tokens: int,
    ) -> None:
        self.owner = owner
        self.tokens_per_step = tokens_per_step
        self.step_s = step_s
        self.queue_s = queue_s
        self.max_tokens = max_tokens
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.truth = Truth()

    def start(self, request_id: str, external: str) -> None:
        self.truth.requests[external] = {
            "tokens": 0,
            "times": [],
            "aborted_at": None,
            "finished": False,
            "internal": request_id,
        }
        self.tasks[request_id] = asyncio.get_running_loop().create_task(
            self.run(request_id, external)
        )

    async def run(self, request_id: str, external: str) -> None:
        record = self.truth.requests[external]
        await asyncio.sleep(self.queue_s)  # waiting for a slot
        next_id = 100
        while record["tokens"] < self.max_tokens:
            await asyncio.sleep(self.step_s)
            n = min(self.tokens_per_step, self.max_tokens - record["tokens"])
            ids = list(range(next_id, next_id + n))
            next_id += n
            record["tokens"] += n
            record["times"].append(time.time())
            last = record["tokens"] >= self.max_tokens
            output = EngineCoreOutput(
                request_id=request_id,
                new_token_ids=ids,
                finish_reason=FinishReason.LENGTH if last else None,
            )
            self.owner.output_processor.process_outputs([output])
        record["finished"] = True

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        for task in self.tasks.values():
            task.cancel()

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            task = self.tasks.pop(request_id, None)
            if task is not None and not task.done():
                task.cancel()
                for record in self.truth.requests.values():
                    if record["internal"] == request_id:
                        record["aborted_at"] = time.time()


class FakeEngine(AsyncLLM):
    """AsyncLLM without a model: its own generate() and abort() run, over a fake core."""

    def __init__(self, core_args: tuple[int, float, float, int]) -> None:  # no super().__init__
        self.output_processor = OutputProcessor(None, log_stats=False)
        self.engine_core = FakeCore(self, *core_args)  # type: ignore[assignment]
        self.log_requests = False
        self.model_config = type("ModelConfig", (), {"served_model_name": MODEL})()

    async def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: Any,  # type: ignore[override]
        *args: Any,
        **kwargs: Any,
    ) -> RequestOutputCollector:
        internal = f"{request_id}-{uuid.uuid4().hex[:8]}"
        queue = RequestOutputCollector(params.output_kind, internal)
        request = EngineCoreRequest(
            request_id=internal,
            prompt_token_ids=[1, 2, 3],
            mm_features=None,
            sampling_params=params,
            pooling_params=None,
            arrival_time=time.time(),
            lora_request=None,
            cache_salt=None,
            data_parallel_rank=None,
            external_req_id=request_id,
        )
        self.output_processor.add_request(request, None, None, 0, queue)
        self.engine_core.start(internal, request_id)  # type: ignore[attr-defined]
        return queue


def _chunk(request_id: str, delta: dict[str, Any], finish: str | None) -> str:
    obj = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(obj)}\n\n"


def build(engine: FakeEngine, argv: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    @with_cancellation
    async def create_chat_completion(body: dict[str, Any], raw_request: Request) -> Any:
        request_id = str(body.get("user") or uuid.uuid4().hex)
        stream = bool(body.get("stream"))
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        params = SamplingParams(max_tokens=10_000, output_kind=kind, detokenize=False)
        generator = engine.generate("hi", params, request_id)
        if stream:

            async def events() -> Any:
                yield _chunk(request_id, {"role": "assistant", "content": ""}, None)
                async for out in generator:
                    text = "".join(f"t{t} " for t in out.outputs[0].token_ids)
                    yield _chunk(request_id, {"content": text}, None)
                yield _chunk(request_id, {}, "length")
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        final = None
        async for out in generator:
            final = out
        assert final is not None
        ids = list(final.outputs[0].token_ids)
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": 0,
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "length",
                        "message": {"role": "assistant", "content": "".join(f"t{t} " for t in ids)},
                    }
                ],
                "usage": {
                    "prompt_tokens": 3,
                    "completion_tokens": len(ids),
                    "total_tokens": 3 + len(ids),
                },
            }
        )

    @app.get("/truth")
    async def truth() -> Any:
        return engine.engine_core.truth.requests  # type: ignore[attr-defined]

    # vLLM's own parser and middleware set-up, as `vllm serve ... --middleware X` runs them.
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", MODEL, *argv])
    init_entrypoints_middleware(args, app, ("generate",))
    return app


def main() -> None:
    port, per_step, step_s, queue_s, max_tokens = sys.argv[1:6]
    plain = "--plain" in sys.argv[6:]
    argv = [] if plain else ["--middleware", "otel_disconnect.DisconnectMiddleware"]
    if not plain:
        from otel_disconnect import metrics_app

        argv_app = metrics_app()
    engine = FakeEngine((int(per_step), float(step_s), float(queue_s), int(max_tokens)))
    app = build(engine, argv)
    if not plain:
        app.mount("/metrics", argv_app)
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    main()
