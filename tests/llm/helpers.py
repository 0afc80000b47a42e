"""Shared pieces of the LLM tests: a simulator on a real port, requests on raw sockets, spans."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

from otel_disconnect.tools.llm_sim import SimConfig, Simulator, create_app

from ..conftest import Telemetry
from ..servers import RawClient, ServerThread, serve, wait_for

TOKEN = re.compile(rb"tok\d+ ")


@contextlib.contextmanager
def simulator(**config: Any) -> Iterator[tuple[ServerThread, Simulator]]:
    sim = Simulator(SimConfig(**config))
    with serve(create_app(simulator=sim), "uvicorn-h11") as server:
        yield server, sim


def post_json(client: RawClient, path: str, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    client.request("POST", path, body=data, headers={"Content-Type": "application/json"})


def read_tokens(client: RawClient, k: int, timeout: float = 10.0) -> int:
    """Read until the k-th token arrived; return how many tokens were received by then."""
    client.read_until(f"tok{k - 1} ".encode(), timeout=timeout)
    return len(TOKEN.findall(client.received))


def server_span(telemetry: Telemetry, path: str) -> Any:
    def find() -> Any:
        for span in telemetry.server_spans():
            attrs = span.attributes or {}
            if path in (attrs.get("http.route"), attrs.get("url.path"), attrs.get("http.target")):
                return span
        return None

    return wait_for(find)


def token_metrics(telemetry: Telemetry, route: str, model: str) -> dict[str, float]:
    labels = {"route": route, "model": model}
    return {
        "total": telemetry.value("otel_disconnect_llm_tokens_total", **labels),
        "after": telemetry.value("otel_disconnect_llm_tokens_after_disconnect_total", **labels),
        "undelivered": telemetry.value("otel_disconnect_llm_tokens_undelivered_total", **labels),
        "generation_after_count": telemetry.value(
            "otel_disconnect_llm_generation_after_disconnect_seconds_count", **labels
        ),
    }


def close_to(value: float, truth: float, tolerance: float = 1) -> bool:
    return abs(value - truth) <= tolerance
