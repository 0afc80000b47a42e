"""HTTP/2 on Hypercorn, Granian and uvicorn's own HTTP/2 (zttp), over h2c and TLS.

One connection carries several requests to the LLM simulator's SSE route; the client resets one
stream (RST_STREAM CANCEL) while the others stay open: that request alone is detected, with the
phase it was in, and its tokens are counted as over HTTP/1.1. GOAWAY or a closed connection ends
every stream still open, and each is detected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_disconnect import instrument_app
from otel_disconnect.tools.llm_sim import SimConfig, Simulator, create_app
from tests.conftest import Telemetry
from tests.h2client import Certificate, H2Client, make_test_certificate
from tests.h2servers import H2_SERVERS, serve_h2
from tests.servers import wait_for

ROUTE = "/v1/chat/completions"
TOKEN = re.compile(rb"tok\d+ ")
JSON = [("content-type", "application/json")]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return make_test_certificate(Path(tmp_path_factory.mktemp("cert")))


@pytest.fixture(params=H2_SERVERS)
def server_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["h2c", "tls"])
def transport(request: pytest.FixtureRequest, certificate: Certificate) -> Any:
    return certificate if request.param == "tls" else None


def chat(user: str, *, stream: bool = True, max_tokens: int | None = None) -> bytes:
    body: dict[str, Any] = {
        "model": "m-h2",
        "stream": stream,
        "user": user,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


def spans_by_case(telemetry: Telemetry, count: int) -> dict[str, dict[str, Any]]:
    """Server spans keyed by the ``case`` query parameter each request carries."""

    def case_of(attrs: dict[str, Any]) -> str | None:
        url = str(attrs.get("url.query") or attrs.get("http.url") or attrs.get("http.target"))
        match = re.search(r"case=(\w+)", url)
        return match.group(1) if match else None

    def collect() -> dict[str, dict[str, Any]] | None:
        found = {}
        for span in telemetry.server_spans():
            attrs = dict(span.attributes or {})
            if ROUTE in str(attrs.get("http.url", attrs.get("url.path"))) and (
                case := case_of(attrs)
            ):
                found[case] = attrs
        return found if len(found) >= count else None

    return wait_for(collect, timeout=20)


def disconnects(telemetry: Telemetry, phase: str) -> float:
    return sum(
        telemetry.value(
            "otel_disconnect_client_disconnects_total",
            route=ROUTE,
            method="POST",
            phase=phase,
            outcome=outcome,
        )
        for outcome in ("completed", "cancelled", "error")
    )


@pytest.fixture
def sim_server(server_kind: str, transport: Any, telemetry: Telemetry) -> Iterator[Any]:
    # record_tokens=False: tokens come from the SSE response itself, as for any LLM server.
    sim = Simulator(
        SimConfig(ttft=0.5, tokens_per_second=40, max_tokens=400, model="m-h2", record_tokens=False)
    )
    app = instrument_app(create_app(simulator=sim), **telemetry.options())
    with serve_h2(app, server_kind, transport) as server:
        server.sim = sim  # type: ignore[attr-defined]
        yield server


def test_one_reset_stream_among_open_neighbours(
    sim_server: Any, transport: Any, telemetry: Telemetry
) -> None:
    sim: Simulator = sim_server.sim
    with H2Client(sim_server.port, certificate=transport) as client:
        # The neighbour: a short stream that must run to [DONE] on the same connection.
        neighbour = client.request(
            "POST", f"{ROUTE}?case=neighbour", headers=JSON, body=chat("neighbour", max_tokens=20)
        )
        # Reset during the request body: half the JSON sent, the stream left open, then CANCEL.
        upload = client.request("POST", f"{ROUTE}?case=body", headers=JSON, end_stream=False)
        client.send_data(upload, chat("body")[:20])
        # Reset before the response: a non-streaming request, reset once the engine admitted it.
        waiting = client.request(
            "POST", f"{ROUTE}?case=waiting", headers=JSON, body=chat("waiting", stream=False)
        )
        # Reset mid-stream, after ten tokens arrived.
        streaming = client.request(
            "POST", f"{ROUTE}?case=streaming", headers=JSON, body=chat("streaming")
        )

        wait_for(lambda: sim.find("waiting") is not None)
        client.reset(waiting)
        client.reset(upload)
        client.read_until(streaming, b"tok9 ")
        received = len(TOKEN.findall(client.reset(streaming)))

        done = client.response(neighbour, timeout=20)
        assert done.status == 200 and done.ended and done.body.endswith(b"data: [DONE]\n\n")
        assert len(TOKEN.findall(done.body)) == 20
        assert not client.connection_closed  # the connection outlived three resets

    spans = spans_by_case(telemetry, 4)
    assert "disconnect.detected" not in spans["neighbour"], spans["neighbour"]
    assert spans["neighbour"]["gen_ai.usage.output_tokens"] == 20
    for case, phase in (
        ("body", "request_body"),
        ("waiting", "before_response"),
        ("streaming", "streaming"),
    ):
        attrs = spans[case]
        assert attrs["disconnect.detected"] is True, (case, attrs)
        assert attrs["disconnect.phase"] == phase, (case, attrs)
    # The upload's handler got ClientDisconnect, the stream was cut short, and the waiting request
    # stopped and answered with the simulator's 499 placeholder: the work stopped each time.
    assert spans["body"]["disconnect.outcome"] == "cancelled"
    assert spans["waiting"]["disconnect.outcome"] == "cancelled"
    assert spans["streaming"]["disconnect.outcome"] == "cancelled"

    cut = spans["streaming"]
    record = wait_for(lambda: (r := sim.find("streaming")) is not None and r.done and r)
    assert record.aborted and record.generated < 400
    assert abs(cut["gen_ai.usage.output_tokens"] - record.generated) <= 1
    assert cut["disconnect.tokens_after"] <= 1
    assert abs(cut["disconnect.tokens_undelivered"] - (record.generated - received)) <= 2
    waiting_record = sim.find("waiting")
    assert waiting_record is not None
    wait_for(lambda: waiting_record.done)
    assert waiting_record.aborted  # the engine stopped for the reset request

    wait_for(
        lambda: telemetry.value("otel_disconnect_requests_total", route=ROUTE, method="POST") == 4
    )
    for phase in ("request_body", "before_response", "streaming"):
        assert disconnects(telemetry, phase) == 1, phase
    labels = {"route": ROUTE, "model": "m-h2"}
    assert (
        telemetry.value("otel_disconnect_llm_tokens_after_disconnect_total", **labels)
        == cut["disconnect.tokens_after"]
    )
    assert (
        telemetry.value("otel_disconnect_llm_tokens_undelivered_total", **labels)
        == cut["disconnect.tokens_undelivered"]
    )
    assert telemetry.value("otel_disconnect_inflight_requests", client="disconnected") == 0


@pytest.mark.parametrize("end", ["goaway", "close"])
def test_goaway_or_closed_connection_ends_every_open_stream(
    sim_server: Any, transport: Any, telemetry: Telemetry, end: str
) -> None:
    sim: Simulator = sim_server.sim
    client = H2Client(sim_server.port, certificate=transport)
    streams = [
        client.request("POST", f"{ROUTE}?case=s{i}", headers=JSON, body=chat(f"s{i}"))
        for i in range(3)
    ]
    for stream in streams:
        client.read_until(stream, b"tok4 ")
    if end == "goaway":
        # GOAWAY alone, the socket left open: each server then closes the connection at once
        # (RFC 9113 would let the open streams finish), so they end as disconnects.
        client.goaway(close=False)
        client.wait(lambda: client.connection_closed)
    client.close()

    spans = spans_by_case(telemetry, 3)
    for i in range(3):
        attrs = spans[f"s{i}"]
        assert attrs["disconnect.detected"] is True, attrs
        assert attrs["disconnect.phase"] == "streaming", attrs
        assert attrs["disconnect.tokens_after"] <= 1, attrs
        record = wait_for(lambda i=i: (r := sim.find(f"s{i}")) is not None and r.done and r)
        assert record.aborted
    wait_for(lambda: disconnects(telemetry, "streaming") == 3)
    assert telemetry.value("otel_disconnect_inflight_requests", client="disconnected") == 0
