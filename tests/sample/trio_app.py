"""A Starlette app inside DisconnectMiddleware, for a server running it on trio."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from otel_disconnect import DisconnectMiddleware, protect


@protect("commit")
async def commit(body: bytes) -> bytes:
    return body[::-1]


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse(await commit(await request.body()))


inner = Starlette(routes=[Route("/hello", hello), Route("/echo", echo, methods=["POST"])])
app = DisconnectMiddleware(inner)
