"""The outcome rule (otel_disconnect/outcome.py) on a real server: apps that stopped their work
after the client left and answered with a placeholder end ``cancelled``; an app that ran its work
to the end for nobody ends ``completed``. vLLM's and LiteLLM's own servers: tests/engines."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from otel_disconnect import DisconnectMiddleware, current

from .conftest import Telemetry
from .servers import RawClient, serve, wait_for


def _app(telemetry: Telemetry) -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    seen: list[str] = []

    async def until_gone() -> None:
        seen.append("started")
        state = current()
        assert state is not None
        await state.wait_disconnected()  # waiting is not "the app saw it and stopped"

    @app.get("/empty")
    async def empty() -> Response:
        await until_gone()
        return Response()  # vLLM's with_cancellation placeholder

    @app.get("/no-content")
    async def no_content() -> Response:
        await until_gone()
        await asyncio.sleep(0.01)  # the work, done for nobody
        return Response(status_code=204)

    @app.get("/closed-request")
    async def closed_request() -> Response:
        await until_gone()
        return JSONResponse({"error": "client closed request"}, status_code=499)  # LiteLLM

    @app.get("/checked")
    async def checked() -> dict[str, Any]:
        seen.append("started")
        parts = []
        for i in range(1000):
            state = current()
            if state is not None and state.disconnected:
                break  # the app looked, and stopped
            parts.append(i)
            await asyncio.sleep(0.005)
        return {"parts": parts}

    @app.get("/finished")
    async def finished() -> dict[str, Any]:
        await until_gone()
        await asyncio.sleep(0.01)
        return {"result": "the whole answer"}  # ran to its end for nobody

    app.add_middleware(DisconnectMiddleware, registry=telemetry.registry)
    return app, seen


@pytest.mark.parametrize(
    "path,expected",
    [
        ("/empty", "cancelled"),
        ("/closed-request", "cancelled"),
        ("/checked", "cancelled"),
        ("/no-content", "completed"),
        ("/finished", "completed"),
    ],
)
@pytest.mark.parametrize("server_kind", ["uvicorn-h11", "hypercorn"])
def test_outcome_rule(server_kind: str, path: str, expected: str, telemetry: Telemetry) -> None:
    app, seen = _app(telemetry)
    with serve(app, server_kind) as server:
        with RawClient(server.port) as client:
            client.request("GET", path)
            wait_for(lambda: seen)
            client.close()

        def counted(outcome: str) -> float:
            return telemetry.value(
                "otel_disconnect_client_disconnects_total",
                route=path,
                method="GET",
                phase="before_response",
                outcome=outcome,
            )

        wait_for(lambda: counted("completed") + counted("cancelled") + counted("error") == 1)
    assert counted(expected) == 1
