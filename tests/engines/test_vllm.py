"""vLLM's real OpenAI server (0.33.0, the newest release, and 0.13.0; .matrix/ environments),
started as ``vllm serve`` starts it, with the middleware added through its own ``--middleware``
parsing: its own ``build_app``, ``init_app_state``, ``OpenAIServingChat`` and ``AsyncLLM``, over
a tiny model directory the test writes (a config and a tokenizer, no weights). Only the engine
core client is fake (tests/engines/vllm_server.py), and it records its ground truth: tokens,
their times, the abort.

The first run builds the environments (vLLM 0.33.0 with torch, about 9 GB and 7 minutes; vLLM
0.13.0 with torch, about 11 GB and 5 minutes)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from ..servers import RawClient, wait_for
from . import tiny_model
from .envs import require
from .procs import Proc, assert_clean_log, delta, read_response, settled, started, value

ROUTE = "/v1/chat/completions"
MODEL = "fake-vllm"
SERVER = Path(__file__).with_name("vllm_server.py")
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One model directory for every server: its path is part of the configuration vLLM hashes
    # into each response's system_fingerprint, compared byte for byte below.
    return tiny_model.write(tmp_path_factory.mktemp("tiny-model"))


# The newest release, and the oldest driven (0.13: its with_cancellation answers None, sent as
# `null`; its own argument parser, build_app and init_app_state in api_server.py).
@pytest.fixture(scope="session", params=["vllm0.33", "vllm0.13"])
def vllm_env(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[Env]:
    with require(request.param) as venv:
        yield Env(venv / "bin" / "python", tiny_model_dir)


class Env(NamedTuple):
    python: Path
    model: Path


def _server(env: Env, tmp: Path, name: str, *config: str, plain: bool = False) -> Any:
    argv = [str(env.python), str(SERVER), "{port}", *config, str(env.model)]
    if plain:
        argv.append("--plain")
    return started(argv, tmp / f"{name}.log", "/truth")


@pytest.fixture(scope="module")
def two_per_step(vllm_env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    # 2 token ids per engine step, a step every 20 ms, no queueing, 40 tokens at most.
    with _server(vllm_env, tmp_path_factory.mktemp("vllm"), "two", "2", "0.02", "0", "40") as p:
        yield p


@pytest.fixture(scope="module")
def queued(vllm_env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    # 1 token per step, 30 ms a step, 0.8 s in the queue before the first step.
    with _server(vllm_env, tmp_path_factory.mktemp("vllm"), "one", "1", "0.03", "0.8", "400") as p:
        yield p


def _post(client: RawClient, user: str, stream: bool) -> None:
    body = json.dumps(
        {
            "model": MODEL,
            "user": user,
            "request_id": user,  # vLLM's own extension: the id the fake core's truth is kept by
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    client.request("POST", ROUTE, body=body, headers={"Content-Type": "application/json"})


def _truth(proc: Proc, user: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(proc.get("/truth"))[user]
    return found


def _done(proc: Proc, user: str) -> dict[str, Any]:
    def check() -> Any:
        record = json.loads(proc.get("/truth")).get(user)
        return record if record and (record["finished"] or record["aborted_at"]) else None

    found: dict[str, Any] = wait_for(check, timeout=30)
    return found


def _metrics(proc: Proc) -> dict[Any, float]:
    return proc.samples("/metrics/")


def _disconnects(samples: dict[Any, float], outcome: str, phase: str) -> float:
    return value(
        samples,
        "otel_disconnect_client_disconnects_total",
        route=ROUTE,
        outcome=outcome,
        phase=phase,
    )


def _settled(proc: Proc, before: dict[Any, float], n: float) -> dict[Any, float]:
    """Metrics once ``n`` more requests ended."""
    return settled(lambda: _metrics(proc), before, n, ROUTE)


def _tokens(before: dict[Any, float], after: dict[Any, float], kind: str = "") -> float:
    name = f"otel_disconnect_llm_tokens{kind}_total"
    return delta(before, after, name, route=ROUTE, model=MODEL)


def _clean_log(proc: Proc) -> None:
    assert_clean_log(proc, _metrics(proc))


def test_stream_cut_short_two_tokens_per_step(two_per_step: Proc) -> None:
    before = _metrics(two_per_step)
    with RawClient(two_per_step.port) as client:
        _post(client, "cut", stream=True)
        client.read_until(b"t106 ")  # 4 steps, 8 tokens in
        client.close()
        closed = time.time()
    truth = _done(two_per_step, "cut")
    after = _settled(two_per_step, before, 1)
    assert truth["aborted_at"] is not None and not truth["finished"]
    assert 8 <= truth["tokens"] < 40
    assert _tokens(before, after) == truth["tokens"]  # exact: 2 token ids per output counted
    tokens_after = 2 * sum(1 for t in truth["times"] if t > closed)
    assert abs(_tokens(before, after, "_after_disconnect") - tokens_after) <= 2  # one step
    assert (
        _disconnects(after, "cancelled", "streaming")
        - _disconnects(before, "cancelled", "streaming")
        == 1
    )
    assert (
        delta(
            before,
            after,
            "otel_disconnect_llm_engine_aborted_requests_total",
            model=MODEL,
            phase="streaming",
        )
        == 1
    )
    assert (
        delta(
            before,
            after,
            "otel_disconnect_llm_engine_aborted_tokens_total",
            model=MODEL,
            phase="streaming",
        )
        == truth["tokens"]
    )
    _clean_log(two_per_step)


def test_client_that_stays_two_tokens_per_step(two_per_step: Proc) -> None:
    before = _metrics(two_per_step)
    text = "".join(tiny_model.token_text(i) for i in range(100, 140))
    for user, stream in (("stays-s", True), ("stays-j", False)):
        with RawClient(two_per_step.port) as client:
            _post(client, user, stream=stream)
            raw = read_response(client)
        body = raw.partition(b"\r\n\r\n")[2]
        if stream:
            # vLLM's detokenizer turned the fake core's ids into text, 2 tokens a chunk.
            assert len(re.findall(rb"t\d+ ", body)) == 40
            assert re.findall(rb'"content":"(t\d+ t\d+ )"', body)[0] == b"t100 t101 "
            assert body.rstrip().endswith(b"data: [DONE]\n\n\r\n0")
        else:
            # vLLM's own OpenAIServingChat answer: its id, the text, the usage.
            answer = json.loads(body)
            assert answer["id"] == f"chatcmpl-{user}"
            assert answer["choices"][0]["message"]["content"] == text
            assert answer["choices"][0]["finish_reason"] == "length"
            assert answer["usage"]["completion_tokens"] == 40
    after = _settled(two_per_step, before, 2)
    assert _tokens(before, after) == 80  # exact, streaming and not
    assert _tokens(before, after, "_after_disconnect") == 0
    _clean_log(two_per_step)


def test_non_streaming_client_timeout(two_per_step: Proc) -> None:
    before = _metrics(two_per_step)
    with RawClient(two_per_step.port) as client:
        _post(client, "timeout", stream=False)
        # The record appears once vLLM has rendered the prompt and added the request.
        wait_for(
            lambda: json.loads(two_per_step.get("/truth")).get("timeout", {}).get("tokens", 0) >= 10
        )
        client.close()
        closed = time.time()
    truth = _done(two_per_step, "timeout")
    after = _settled(two_per_step, before, 1)
    assert truth["aborted_at"] is not None
    tokens_after = 2 * sum(1 for t in truth["times"] if t > closed)
    # with_cancellation cancelled the handler, AsyncLLM.generate aborted, vLLM answered an
    # empty Response(): the work stopped.
    assert (
        _disconnects(after, "cancelled", "before_response")
        - _disconnects(before, "cancelled", "before_response")
        == 1
    )
    assert abs(_tokens(before, after) - truth["tokens"]) <= 1
    assert abs(_tokens(before, after, "_after_disconnect") - tokens_after) <= 2  # one step
    _clean_log(two_per_step)


def test_client_leaves_before_the_first_token(queued: Proc) -> None:
    before = _metrics(queued)
    with RawClient(queued.port) as client:
        _post(client, "early", stream=True)
        wait_for(lambda: "early" in json.loads(queued.get("/truth")))
        client.close()
    truth = _done(queued, "early")
    after = _settled(queued, before, 1)
    assert truth["tokens"] == 0 and truth["aborted_at"] is not None
    assert _tokens(before, after) == 0
    assert (
        delta(before, after, "otel_disconnect_llm_engine_aborted_requests_total", model=MODEL) == 1
    )
    assert delta(before, after, "otel_disconnect_llm_engine_aborted_tokens_total") == 0
    # vLLM's handler returned its StreamingResponse at once: the headers went out (phase
    # streaming), the body had nothing yet (vLLM sends the role chunk with the first output).
    assert (
        _disconnects(after, "cancelled", "streaming")
        - _disconnects(before, "cancelled", "streaming")
        == 1
    )
    _clean_log(queued)


def _masked(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = [re.sub(rb"^(date): .*", rb"\1: *", h, flags=re.I) for h in lines[1:]]
    # vLLM's timestamps (seconds): the same length, so the chunk sizes are unchanged.
    return lines[0], headers, re.sub(rb'"created":\d+', b'"created":*', body)


def test_responses_identical_with_and_without_the_package(
    vllm_env: Env, two_per_step: Proc, tmp_path: Path
) -> None:
    def fetch(proc: Proc, user: str, stream: bool) -> bytes:
        with RawClient(proc.port) as client:
            _post(client, user, stream=stream)
            return read_response(client)

    with _server(vllm_env, tmp_path, "plain", "2", "0.02", "0", "40", plain=True) as plain:
        for stream in (True, False):
            user = f"same-{stream}"
            assert _masked(fetch(plain, user, stream)) == _masked(fetch(two_per_step, user, stream))
