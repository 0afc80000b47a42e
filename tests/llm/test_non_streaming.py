"""A non-streaming handler awaiting a 3-second generation whose client leaves at 1 s."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from otel_disconnect import instrument_app
from otel_disconnect.context import current_state
from otel_disconnect.llm import record_tokens

from ..conftest import Telemetry
from ..servers import RawClient, serve, wait_for
from .helpers import close_to, post_json, server_span, simulator, token_metrics

TOKENS = 60  # 3 s at 20 tokens/s


def build_app(upstream: str, states: dict[str, Any], telemetry: Telemetry) -> FastAPI:
    app = FastAPI()
    client = httpx.AsyncClient(base_url=upstream, timeout=30)

    @app.post("/per-token")
    async def per_token(body: dict[str, Any]) -> dict[str, str]:
        """Streams from the engine and records each token as it comes: exact."""
        states["per-token"] = current_state()  # the record: the test reads its detection time
        body = {**body, "stream": True, "user": "per-token"}
        text = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if '"content":"tok' in line:
                    record_tokens(1, model="m-ns")
                    text.append(line)
        return {"tokens": str(len(text))}

    @app.post("/usage-only")
    async def usage_only(body: dict[str, Any]) -> Any:
        """Awaits the whole completion: only its usage total is known, so the split is estimated."""
        states["usage-only"] = current_state()  # the record: the test reads its detection time
        response = await client.post("/v1/chat/completions", json={**body, "user": "usage-only"})
        return response.json()

    return instrument_app(app, **telemetry.options())


@pytest.mark.parametrize("path", ["/per-token", "/usage-only"])
def test_client_gone_at_one_second(path: str, telemetry: Telemetry) -> None:
    states: dict[str, Any] = {}
    user = path.strip("/")
    with simulator(ttft=0.0, tokens_per_second=20, max_tokens=TOKENS, model="m-ns") as (up, sim):
        app = build_app(up.url, states, telemetry)
        with serve(app, "uvicorn-h11") as server, RawClient(server.port) as client:
            messages = [{"role": "user", "content": "q"}]
            post_json(client, path, {"model": "m-ns", "messages": messages})
            wait_for(lambda: sim.find(user) is not None)
            time.sleep(1.0)  # the scenario: the client gives up after one second
            client.close()
            record = wait_for(lambda: (r := sim.find(user)) is not None and r.done and r)
            span = server_span(telemetry, path)

    state = states.pop(user)  # the app outlives the test (the instrumentor keeps it)
    truth_after = record.generated_after(state.detected_perf)
    assert record.generated == TOKENS and 30 <= truth_after <= 50
    attrs = span.attributes
    assert attrs["disconnect.phase"] == "before_response"
    assert attrs["gen_ai.usage.output_tokens"] == TOKENS
    assert attrs["disconnect.tokens_undelivered"] == TOKENS  # no response had started
    if path == "/per-token":
        assert close_to(attrs["disconnect.tokens_after"], truth_after)
        assert "disconnect.tokens_estimated" not in attrs
    else:
        # Pro rata by time over the upstream call: the simulator generates at a steady rate.
        assert close_to(attrs["disconnect.tokens_after"], truth_after)
        assert attrs["disconnect.tokens_estimated"] is True
    metrics = token_metrics(telemetry, path, "m-ns")
    assert metrics["total"] == TOKENS
    assert metrics["after"] == attrs["disconnect.tokens_after"]
    assert metrics["undelivered"] == TOKENS
