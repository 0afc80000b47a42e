"""The simulator alone: OpenAI shapes, vLLM-named metrics, ground truth, the switch, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..servers import RawClient, free_port, wait_for
from .helpers import post_json, read_tokens, simulator

LABELS = {"model_name": "m-sim", "engine": "0"}


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, tuple(sorted({**LABELS, **labels}.items()))), 0.0)


def test_openai_shapes_and_vllm_metrics() -> None:
    with simulator(ttft=0.0, tokens_per_second=5000, max_tokens=8, model="m-sim") as (server, _):
        models = httpx.get(server.url + "/v1/models").json()
        assert models["data"][0]["id"] == "m-sim"
        full = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "m-sim", "messages": [{"role": "user", "content": "one two three"}],
        }).json()
        assert full["object"] == "chat.completion"
        assert full["choices"][0]["message"]["content"] == "".join(f"tok{i} " for i in range(8))
        assert full["choices"][0]["finish_reason"] == "stop"
        assert full["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
        with httpx.stream("POST", server.url + "/v1/completions", json={
            "model": "m-sim", "prompt": "x", "stream": True, "max_tokens": 5,
            "stream_options": {"include_usage": True},
        }) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["text"] for c in chunks[:5]] == [f"tok{i} " for i in range(5)]
        assert chunks[5]["choices"][0]["finish_reason"] == "length"
        assert chunks[6]["choices"] == [] and chunks[6]["usage"]["completion_tokens"] == 5
        samples = _samples(server.url)
        truth = httpx.get(server.url + "/sim/requests").json()["requests"]

    assert [r["generated"] for r in truth] == [8, 5]
    assert _value(samples, "vllm:generation_tokens_total") == 13
    assert _value(samples, "vllm:prompt_tokens_total") == 4
    assert _value(samples, "vllm:request_success_total", finished_reason="stop") == 1
    assert _value(samples, "vllm:request_success_total", finished_reason="length") == 1
    assert _value(samples, "vllm:e2e_request_latency_seconds_count") == 2
    assert _value(samples, "vllm:num_requests_running") == 0
    assert _value(samples, "vllm:num_requests_waiting") == 0
    assert _value(samples, "vllm:kv_cache_usage_perc") == 0
    assert samples[("DCGM_FI_DEV_POWER_USAGE", (("gpu", "0"), ("modelName", "simulated")))] == 70


def _stream_and_leave(port: int, user: str) -> None:
    with RawClient(port) as client:
        post_json(client, "/v1/chat/completions", {
            "model": "m-sim", "stream": True, "user": user,
            "messages": [{"role": "user", "content": "hi"}],
        })
        read_tokens(client, 5)


def test_abort_on_disconnect_by_default() -> None:
    config = {"ttft": 0.0, "tokens_per_second": 200, "max_tokens": 200, "model": "m-sim"}
    with simulator(**config) as (server, sim):
        _stream_and_leave(server.port, "a")
        record = wait_for(lambda: (r := sim.find("a")) is not None and r.done and r)
        samples = _samples(server.url)
    assert record.aborted and record.client_disconnected_at is not None
    assert record.generated_after_disconnect <= 1
    assert _value(samples, "vllm:request_success_total", finished_reason="abort") == 1


def test_keep_generating_after_disconnect() -> None:
    with simulator(ttft=0.0, tokens_per_second=400, max_tokens=600, model="m-sim",
                   keep_generating_after_disconnect=True, max_num_seqs=1) as (server, sim):
        _stream_and_leave(server.port, "k")
        wait_for(lambda: (r := sim.find("k")) is not None and r.client_disconnected_at)
        # While it generates for nobody it holds the only slot: the GPU is busy, power is up.
        running = sim.registry.get_sample_value("vllm:num_requests_running", LABELS)
        power = sim.registry.get_sample_value(
            "DCGM_FI_DEV_POWER_USAGE", {"gpu": "0", "modelName": "simulated"}
        )
        record = wait_for(lambda: (r := sim.find("k")) is not None and r.done and r)
        samples = _samples(server.url)
    assert (running, power) == (1, 95)
    assert not record.aborted and record.generated == 600
    assert record.generated_after_disconnect >= 300
    assert _value(samples, "vllm:request_success_total", finished_reason="stop") == 1


def test_python_dash_m_runs_the_server() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "otel_disconnect", "sim", "--port", str(port), "--ttft", "0",
         "--tokens-per-second", "1000", "--max-tokens", "3", "--model", "m-cli"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        wait_for(up, timeout=30, interval=0.1)
        assert proc.poll() is None
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"model": "m-cli", "prompt": "p"}).json()
        assert reply["choices"][0]["text"] == "tok0 tok1 tok2 "
        # Served as vLLM with --middleware: one /metrics with both families of series.
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'vllm:generation_tokens_total{engine="0",model_name="m-cli"} 3.0' in text
        assert ('otel_disconnect_llm_tokens_total{model="m-cli",route="/v1/completions"} 3.0'
                in text)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_instrumented_simulator_counts_tokens_generated_for_nobody() -> None:
    """``instrument=True`` adds the middleware as ``vllm serve --middleware`` does (default
    registry); the engine's record_tokens() counts what it generates after the client left."""
    from prometheus_client import REGISTRY

    from otel_disconnect.telemetry.metrics import metrics_for
    from otel_disconnect.tools.llm_sim import SimConfig, Simulator, create_app

    from ..servers import serve

    labels = {"route": "/v1/chat/completions", "model": "m-waste"}

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    metrics_for(None)  # the middleware's metrics exist before the first read
    before = {n: value(n) for n in ("otel_disconnect_llm_tokens_total",
                                    "otel_disconnect_llm_tokens_after_disconnect_total")}
    sim = Simulator(SimConfig(ttft=0.0, tokens_per_second=200, max_tokens=80, model="m-waste",
                              keep_generating_after_disconnect=True))
    with serve(create_app(simulator=sim, instrument=True), "uvicorn-h11") as server:
        _stream_and_leave(server.port, "w")
        record = wait_for(lambda: (r := sim.find("w")) is not None and r.done and r)
        wait_for(lambda: value("otel_disconnect_llm_tokens_total")
                 - before["otel_disconnect_llm_tokens_total"] == 80)
    after = value("otel_disconnect_llm_tokens_after_disconnect_total")
    after -= before["otel_disconnect_llm_tokens_after_disconnect_total"]
    assert record.generated == 80
    assert abs(after - record.generated_after_disconnect) <= 1
