"""vLLM's real OpenAI server, started as ``vllm serve`` starts it, over a fake engine core.

Run in a vLLM environment (.matrix/; vLLM 0.33.0 and 0.13.0):

    python tests/engines/vllm_server.py PORT TOKENS_PER_STEP STEP_S QUEUE_S MAX_TOKENS MODEL_DIR
        [--plain]

Real vLLM code, all of it as ``vllm serve MODEL_DIR --middleware
otel_disconnect.DisconnectMiddleware`` runs it: the ``vllm`` CLI's ``main()`` (its argument parser,
``run_server`` → ``run_server_worker`` → ``build_async_engine_client`` →
``AsyncEngineArgs.create_engine_config`` → ``AsyncLLM.from_vllm_config``, then ``build_app`` +
``init_app_state`` + ``serve_http`` on uvicorn: 0.33 through ``build_and_serve``, 0.13 in
``vllm.entrypoints.openai.api_server``), its ``ModelConfig`` and tokenizer read from MODEL_DIR
(tests/engines/tiny_model.py: a config and a word-level tokenizer, no weights),
``OpenAIServingChat`` behind the real ``/v1/chat/completions`` route (``with_cancellation``,
``load_aware_call``), the real ``AsyncLLM`` (``generate``, ``abort``, its output handler loop,
the ``InputProcessor``, the ``OutputProcessor`` and its incremental detokenizer,
``RequestOutputCollector``), vLLM's own ``/metrics`` (the global Prometheus registry, where
otel-disconnect's metrics are too), its CPU platform (chosen through a ``vllm.platform_plugins``
entry point: 0.13 picks it only for a CPU build of vLLM, and these are CUDA builds).

Fake: the engine core client only (``EngineCoreClient.make_async_mp_client`` returns
``FakeCore``: no engine process, no model, no GPU). It runs every request ``QUEUE_S`` seconds in
the queue, then a step every ``STEP_S`` seconds emitting ``TOKENS_PER_STEP`` token ids (100, 101,
...; the tokenizer decodes id i to ``"t{i} "``) until ``MAX_TOKENS`` (finish reason ``length``),
honours aborts, and records its ground truth (tokens, the time of each step, the abort time) by
the request's id (``request_id`` in the body), served at ``GET /truth``. That route is added
through vLLM's own endpoint-plugin mechanism (an entry point in a ``.dist-info`` this script
writes to a temporary directory, allowed by ``VLLM_PLUGINS``), so vLLM's ``build_app`` adds it;
vLLM 0.13 has no endpoint plugins, and the app its ``build_app`` returns gets the route.

``--plain`` leaves the middleware out (the byte-identity check).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PLUGIN = "otel_disconnect_truth"
MODEL = "fake-vllm"
FIRST_TOKEN_ID = 100
# No GPU here: vLLM's CPU platform. Quiet INFO logs (the log is checked for tracebacks and for
# any mention of otel_disconnect; vLLM logs its non-default arguments at INFO). No network.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["VLLM_PLUGINS"] = PLUGIN


def cpu_platform() -> str:
    """A vLLM platform plugin (``vllm.platform_plugins``): vLLM's own CPU platform. vLLM 0.33
    also picks it from ``VLLM_TARGET_DEVICE=cpu``; 0.13 only for a CPU build of vLLM."""
    return "vllm.platforms.cpu.CpuPlatform"


def install_plugins() -> None:
    """An installed distribution's metadata, as importlib.metadata finds it on sys.path: the
    endpoint plugin (``GET /truth``) and the platform plugin, both allowed by ``VLLM_PLUGINS``.
    Before vLLM is imported: it resolves its platform on first use."""
    where = Path(tempfile.mkdtemp(prefix="vllm-test-plugins-"))
    info = where / f"{PLUGIN}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[vllm.endpoint_plugins]\n{PLUGIN} = __main__:TruthPlugin\n\n"
        f"[vllm.platform_plugins]\n{PLUGIN} = __main__:cpu_platform\n"
    )
    sys.path.append(str(where))
    atexit.register(shutil.rmtree, where, ignore_errors=True)


if __name__ == "__main__":
    install_plugins()

from fastapi import FastAPI, Request  # noqa: E402
from vllm.v1.engine import (  # noqa: E402
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
)
from vllm.v1.engine.core_client import EngineCoreClient  # noqa: E402


class Running:
    __slots__ = ("limit", "next_at", "next_id", "record", "request_id")

    def __init__(self, request_id: str, record: dict[str, Any], start: float, limit: int) -> None:
        self.request_id = request_id
        self.record = record
        self.next_at = start
        self.next_id = FIRST_TOKEN_ID
        self.limit = limit


class FakeCore(EngineCoreClient):
    """The engine core client's place (``AsyncMPClient``): AsyncLLM adds and aborts requests
    here, and its output handler loop awaits ``get_output_async()`` for each engine step."""

    def __init__(
        self, tokens_per_step: int, step_s: float, queue_s: float, max_tokens: int
    ) -> None:
        self.tokens_per_step = tokens_per_step
        self.step_s = step_s
        self.queue_s = queue_s
        self.max_tokens = max_tokens
        self.engine_ranks_managed = [0]
        self.resources = SimpleNamespace(engine_dead=False)
        self.running: dict[str, Running] = {}
        self.truth: dict[str, dict[str, Any]] = {}
        self._wake: asyncio.Event | None = None

    @property
    def wake(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    # What AsyncLLM and the serving layer call.
    async def get_supported_tasks_async(self) -> tuple[Any, ...]:
        return ("generate",)

    async def reset_mm_cache_async(self) -> None:
        return None

    async def is_sleeping_async(self) -> bool:
        return False

    def dp_engines_running(self) -> bool:
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        self.running.clear()

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        # vLLM 0.33 adds a suffix to the engine's id and keeps the caller's; 0.13 has one id.
        external = getattr(request, "external_req_id", None) or request.request_id
        key = external.removeprefix("chatcmpl-")
        if key in self.truth:  # n > 1: the children share the parent's external id
            key = f"{key}/{request.request_id}"
        record: dict[str, Any] = {
            "tokens": 0,
            "times": [],
            "aborted_at": None,
            "finished": False,
            "internal": request.request_id,
        }
        self.truth[key] = record
        limit = self.max_tokens
        params = request.sampling_params
        if params is not None and params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        start = time.monotonic() + self.queue_s + self.step_s
        self.running[request.request_id] = Running(request.request_id, record, start, limit)
        self.wake.set()

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            running = self.running.pop(request_id, None)
            if running is not None:
                running.record["aborted_at"] = time.time()

    async def get_output_async(self) -> EngineCoreOutputs:
        """The next engine step: the outputs of every request whose step is due."""
        while True:
            now = time.monotonic()
            due = [r for r in self.running.values() if r.next_at <= now]
            if due:
                return EngineCoreOutputs(outputs=[self._step(r, now) for r in due])
            self.wake.clear()
            nearest = min((r.next_at for r in self.running.values()), default=None)
            with contextlib.suppress(TimeoutError):  # the next step is due
                await asyncio.wait_for(
                    self.wake.wait(), None if nearest is None else max(0.0, nearest - now)
                )

    def _step(self, running: Running, now: float) -> EngineCoreOutput:
        record = running.record
        n = min(self.tokens_per_step, running.limit - record["tokens"])
        ids = list(range(running.next_id, running.next_id + n))
        running.next_id += n
        running.next_at = now + self.step_s  # a late loop slows the rate, never bursts
        record["tokens"] += n
        record["times"].append(time.time())
        last = record["tokens"] >= running.limit
        if last:
            record["finished"] = True
            del self.running[running.request_id]
        return EngineCoreOutput(
            request_id=running.request_id,
            new_token_ids=ids,
            finish_reason=FinishReason.LENGTH if last else None,
        )


async def truth(request: Request) -> Any:
    return request.app.state.engine_client.engine_core.truth


class TruthPlugin:
    """A vLLM endpoint plugin (``vllm.endpoint_plugins``): ``GET /truth``, the fake core's
    ground truth."""

    name = PLUGIN
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.add_api_route("/truth", truth, methods=["GET"])

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        return None


def truth_route_without_endpoint_plugins() -> None:
    """vLLM before endpoint plugins (0.13): the app that ``run_server_worker`` builds with its
    module's ``build_app(args)`` gets the same route."""
    if importlib.util.find_spec("vllm.plugins.endpoint_plugins") is not None:
        return
    from vllm.entrypoints.openai import api_server

    original = api_server.build_app

    def build_app(*args: Any, **kwargs: Any) -> FastAPI:
        app: FastAPI = original(*args, **kwargs)
        TruthPlugin().attach_router(app)
        return app

    api_server.build_app = build_app


def main() -> None:
    port, per_step, step_s, queue_s, max_tokens, model = sys.argv[1:7]
    plain = "--plain" in sys.argv[7:]
    core = FakeCore(int(per_step), float(step_s), float(queue_s), int(max_tokens))

    def make_async_mp_client(**kwargs: Any) -> FakeCore:
        return core

    EngineCoreClient.make_async_mp_client = staticmethod(make_async_mp_client)  # type: ignore[method-assign]
    truth_route_without_endpoint_plugins()
    sys.argv = [
        "vllm",
        "serve",
        model,
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--max-model-len",
        "1024",
        "--uvicorn-log-level",
        "warning",
    ]
    if not plain:
        sys.argv += ["--middleware", "otel_disconnect.DisconnectMiddleware"]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
