"""The LiteLLM proxy (real, .matrix/ environment) under ``opentelemetry-instrument``, routing to
``otel-disconnect sim``, which records the ground truth (tokens, abort)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..servers import RawClient, wait_for
from .envs import require
from .procs import Proc, assert_clean_log, quiet_otel, read_response, settled, started, value

ROUTE = "/v1/chat/completions"
KEY = "sk-otel-disconnect-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def litellm_env() -> Iterator[Path]:
    with require("litellm") as venv:
        yield venv


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("sim")
    argv = [
        sys.executable,
        "-m",
        "otel_disconnect",
        "sim",
        "--port",
        "{port}",
        "--ttft",
        "0.8",
        "--tokens-per-second",
        "40",
        "--max-tokens",
        "40",
    ]
    with started(argv, tmp / "sim.log", "/health") as proc:
        yield proc


def _config(tmp: Path, sim: Proc) -> Path:
    config = tmp / "config.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: sim\n"
        "    litellm_params:\n"
        "      model: openai/sim\n"
        f"      api_base: http://127.0.0.1:{sim.port}/v1\n"
        "      api_key: sk-upstream\n"
        "litellm_settings:\n"
        "  callbacks: [prometheus]\n"
        "general_settings:\n"
        f"  master_key: {KEY}\n"
    )
    return config


def _litellm(env: Path, tmp: Path, sim: Proc, instrumented: bool, name: str) -> Any:
    litellm = [
        str(env / "bin" / "litellm"),
        "-c",
        str(_config(tmp, sim)),
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--num_workers",
        "1",
    ]
    argv = [str(env / "bin" / "opentelemetry-instrument"), *litellm] if instrumented else litellm
    otel = {**quiet_otel("litellm"), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no network here
    return started(argv, tmp / f"{name}.log", "/health/liveliness", env=otel)


@pytest.fixture(scope="module")
def proxy(litellm_env: Path, sim: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    with _litellm(litellm_env, tmp_path_factory.mktemp("litellm"), sim, True, "proxy") as proc:
        yield proc


def _post(client: RawClient, user: str, stream: bool) -> None:
    body = json.dumps(
        {
            "model": "sim",
            "user": user,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    client.request("POST", ROUTE, body=body, headers={"Content-Type": "application/json", **AUTH})


def _records(sim: Proc) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(sim.get("/sim/requests"))["requests"]
    return found


def _record(sim: Proc, index: int) -> dict[str, Any] | None:
    """The simulator's record of its ``index``-th request. LiteLLM does not pass ``user`` on,
    so requests are told apart by order: each test sends one at a time."""
    records = _records(sim)
    return records[index] if len(records) > index else None


def _done(sim: Proc, index: int) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: (r := _record(sim, index)) is not None and r.get("finished_reason") and r,
        timeout=30,
    )
    return found


def _metrics(proxy: Proc) -> dict[Any, float]:
    return proxy.samples("/metrics", AUTH)


def _disconnects(samples: dict[Any, float], outcome: str, phase: str | None = None) -> float:
    labels = {"route": ROUTE, "outcome": outcome, **({"phase": phase} if phase else {})}
    return value(samples, "otel_disconnect_client_disconnects_total", **labels)


def _settled(proxy: Proc, before: dict[Any, float], n: float) -> dict[Any, float]:
    return settled(lambda: _metrics(proxy), before, n, ROUTE)


def _clean_log(proxy: Proc) -> None:
    assert_clean_log(proxy, _metrics(proxy), tracebacks=False)


def test_one_scrape_shows_litellm_and_otel_disconnect(proxy: Proc) -> None:
    with RawClient(proxy.port) as client:
        _post(client, "scrape", stream=False)
        client.read_until(b"total_tokens")
    text = proxy.get("/metrics", AUTH).decode()
    assert "otel_disconnect_requests_total" in text
    assert re.search(r"^litellm_\w+", text, re.M), text[:2000]


def test_client_gone_before_the_first_token(proxy: Proc, sim: Proc) -> None:
    # One whole stream first: in a fresh proxy the first streamed request was seen to run its
    # upstream to the end although its client left before the first token (not explained yet;
    # a later one is cancelled as LiteLLM's code says).
    with RawClient(proxy.port) as client:
        _post(client, "warm", stream=True)
        client.read_until(b"[DONE]", timeout=30)
    before, index = _metrics(proxy), len(_records(sim))
    with RawClient(proxy.port) as client:
        _post(client, "early", stream=True)
        wait_for(lambda: _record(sim, index) is not None)
        client.close()
    record = _done(sim, index)
    after = _settled(proxy, before, 1)
    assert record["finished_reason"] == "abort" and record["generated"] == 0, (
        _records(sim),
        proxy.log_text()[-3000:],
    )
    # LiteLLM closed its upstream stream and answered 499: the work stopped.
    assert _disconnects(after, "cancelled") - _disconnects(before, "cancelled") == 1
    assert _disconnects(after, "completed") == _disconnects(before, "completed")
    _clean_log(proxy)


def test_stream_cut_short(proxy: Proc, sim: Proc) -> None:
    before, index = _metrics(proxy), len(_records(sim))
    with RawClient(proxy.port) as client:
        _post(client, "cut", stream=True)
        client.read_until(b"tok4 ")
        client.close()
    record = _done(sim, index)
    after = _settled(proxy, before, 1)
    assert record["finished_reason"] == "abort" and record["generated"] < 40
    assert (
        _disconnects(after, "cancelled", "streaming")
        - _disconnects(before, "cancelled", "streaming")
        == 1
    )
    total = value(after, "otel_disconnect_llm_tokens_total", route=ROUTE) - value(
        before, "otel_disconnect_llm_tokens_total", route=ROUTE
    )
    assert abs(total - record["generated"]) <= 1
    _clean_log(proxy)


def test_client_that_stays(proxy: Proc, sim: Proc) -> None:
    before, index = _metrics(proxy), len(_records(sim))
    with RawClient(proxy.port) as client:
        _post(client, "stays", stream=True)
        client.read_until(b"[DONE]")
    record = _done(sim, index)
    after = _settled(proxy, before, 1)
    total = value(after, "otel_disconnect_llm_tokens_total", route=ROUTE) - value(
        before, "otel_disconnect_llm_tokens_total", route=ROUTE
    )
    assert record["generated"] == 40 and total == 40
    assert _disconnects(after, "cancelled") == _disconnects(before, "cancelled")
    _clean_log(proxy)


def test_non_streaming_client_timeout(proxy: Proc, sim: Proc) -> None:
    before, index = _metrics(proxy), len(_records(sim))
    with RawClient(proxy.port) as client:
        _post(client, "timeout", stream=False)
        wait_for(lambda: (r := _record(sim, index)) is not None and r["generated"] >= 5)
        client.close()
    record = _done(sim, index)
    after = _settled(proxy, before, 1)
    # LiteLLM keeps a non-streaming upstream call running by default (its setting to cancel it
    # is off): the upstream generates every token for nobody, and the outcome says so.
    expected = "cancelled" if record["finished_reason"] == "abort" else "completed"
    moved = _disconnects(after, expected, "before_response") - _disconnects(
        before, expected, "before_response"
    )
    assert moved == 1
    total = value(after, "otel_disconnect_llm_tokens_total", route=ROUTE) - value(
        before, "otel_disconnect_llm_tokens_total", route=ROUTE
    )
    assert abs(total - record["generated"]) <= 1
    _clean_log(proxy)


_MASKS = [
    (rb'"id": ?"[^"]*"', b'"id":"*"'),
    (rb'"created": ?\d+', b'"created":*'),
    (rb'"system_fingerprint": ?("[^"]*"|null)', b'"system_fingerprint":*'),
]


def _masked(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    names = [h.split(b":", 1)[0].lower() for h in lines[1:]]
    statics = [h for h in lines[1:] if h.split(b":", 1)[0].lower() in (b"content-type",)]
    for pattern, repl in _MASKS:
        body = re.sub(pattern, repl, body)
    body = re.sub(rb"\r\n[0-9a-f]+\r\n", b"\r\n", b"\r\n" + body)  # chunk sizes
    return lines[0], names + statics, body


def test_responses_identical_with_and_without_the_package(
    litellm_env: Path, sim: Proc, proxy: Proc, tmp_path: Path
) -> None:
    def fetch(proc: Proc, user: str, stream: bool) -> bytes:
        with RawClient(proc.port) as client:
            _post(client, user, stream=stream)
            return read_response(client)

    with _litellm(litellm_env, tmp_path, sim, False, "plain") as plain:
        for stream in (True, False):
            user = f"same-{stream}"
            assert _masked(fetch(plain, user, stream)) == _masked(fetch(proxy, user, stream))
