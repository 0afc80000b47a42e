"""An unchanged plain Starlette app."""

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def slow(request: Request) -> JSONResponse:
    await asyncio.sleep(1.0)
    return JSONResponse({"done": True})


app = Starlette(routes=[Route("/slow", slow)])
