"""The app's own OpenAI-compatible responses: the simulator itself instrumented, real sockets."""

from __future__ import annotations

from typing import Any

import pytest

from otel_disconnect import instrument_app
from otel_disconnect.tools.llm_sim import SimConfig, Simulator, create_app

from ..conftest import Telemetry
from ..servers import RawClient, serve, wait_for
from .helpers import close_to, post_json, read_tokens, server_span, token_metrics


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_cut_after_k_tokens(path: str, telemetry: Telemetry) -> None:
    sim = Simulator(SimConfig(ttft=0.0, tokens_per_second=40, max_tokens=400, model="m-stream",
                              record_tokens=False))
    app = instrument_app(create_app(simulator=sim), **telemetry.options())
    body: dict[str, Any] = {"model": "m-stream", "stream": True, "user": "cut"}
    body["messages" if "chat" in path else "prompt"] = (
        [{"role": "user", "content": "hi"}] if "chat" in path else "hi"
    )
    with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
        post_json(client, path, body)
        received = read_tokens(client, 10)
        client.close()
        record = wait_for(lambda: (r := sim.find("cut")) is not None and r.done and r)
        span = server_span(telemetry, path)

    attrs = span.attributes
    assert record.aborted and record.generated < 400
    assert attrs["disconnect.detected"] is True
    assert close_to(attrs["gen_ai.usage.output_tokens"], record.generated)
    # Detected within milliseconds of the close, while tokens come every 25 ms.
    assert attrs["disconnect.tokens_after"] <= 1
    assert close_to(attrs["disconnect.tokens_undelivered"], record.generated - received)
    # Counted one token per chunk with no usage figure to confirm it: an estimate (the simulator
    # sends one token a chunk, but a vLLM stream may carry several).
    assert attrs["disconnect.tokens_estimated"] is True
    metrics = token_metrics(telemetry, path, "m-stream")
    assert metrics["total"] == attrs["gen_ai.usage.output_tokens"]
    assert metrics["after"] == attrs["disconnect.tokens_after"]
    assert metrics["undelivered"] == attrs["disconnect.tokens_undelivered"]
    assert metrics["generation_after_count"] == 1


def test_completed_stream_with_usage_chunk_is_exact(telemetry: Telemetry) -> None:
    sim = Simulator(SimConfig(ttft=0.0, tokens_per_second=2000, max_tokens=30, model="m-usage",
                              record_tokens=False))
    app = instrument_app(create_app(simulator=sim), **telemetry.options())
    with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
        post_json(client, "/v1/chat/completions", {
            "model": "m-usage", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}],
        })
        client.read_until(b"[DONE]")
        span = server_span(telemetry, "/v1/chat/completions")
    attrs = span.attributes
    assert attrs["gen_ai.usage.output_tokens"] == 30
    assert "disconnect.tokens_after" not in attrs and "disconnect.tokens_estimated" not in attrs
    assert token_metrics(telemetry, "/v1/chat/completions", "m-usage")["total"] == 30


def test_json_response_usage_counts_without_a_disconnect(telemetry: Telemetry) -> None:
    sim = Simulator(SimConfig(ttft=0.0, tokens_per_second=2000, max_tokens=50, model="m-json",
                              record_tokens=False))
    app = instrument_app(create_app(simulator=sim), **telemetry.options())
    with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
        post_json(client, "/v1/completions", {"model": "m-json", "prompt": "a b", "max_tokens": 12})
        client.read_until(b'"total_tokens"')
        span = server_span(telemetry, "/v1/completions")
    assert span.attributes["gen_ai.usage.output_tokens"] == 12
    assert "disconnect.tokens_estimated" not in span.attributes  # usage alone, nothing to split
    assert token_metrics(telemetry, "/v1/completions", "m-json")["total"] == 12
