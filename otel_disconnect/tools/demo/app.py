"""The demo's chat gateway: an OpenAI-compatible FastAPI app in front of an LLM.

It uses PostgreSQL the way such gateways do: the user's message is written in a transaction that
stays open while the model answers, and the answer and the quota are written and committed at
the end. Streaming answers are read from the model by a producer task feeding a queue (so a slow
client does not slow the model down), and the response streams from the queue.

``safe=False`` is the code as people write it. ``safe=True`` is the same code with the tools of
otel-disconnect: ``cancel_on_disconnect``, ``protect("commit")`` around the commits, and
``guard_stream(on_close=...)`` stopping the producer when the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from otel_disconnect import PgActivityCollector, guard_stream, instrument_app, protect

MODEL = "sim-model"
ROUTE = "/v1/chat/completions"
UPSTREAM_TIMEOUT_S = 30.0  # the gateway's own timeout: longer than its clients' 10 s

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS demo_message (id bigserial PRIMARY KEY, user_id text NOT NULL,"
    " role text NOT NULL, content text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS demo_quota (user_id text PRIMARY KEY,"
    " tokens_used bigint NOT NULL DEFAULT 0, requests bigint NOT NULL DEFAULT 0)",
)
INSERT_MESSAGE = "INSERT INTO demo_message (user_id, role, content) VALUES (:user, :role, :content)"
CHARGE = (
    "INSERT INTO demo_quota (user_id, tokens_used, requests) VALUES (:user, :tokens, 1)"
    " ON CONFLICT (user_id) DO UPDATE SET tokens_used = demo_quota.tokens_used + :tokens,"
    " requests = demo_quota.requests + 1"
)


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str = MODEL
    messages: list[Message]
    stream: bool = False
    max_tokens: int | None = None
    user: str = "anonymous"


@dataclass(frozen=True)
class GatewayConfig:
    llm_url: str
    database_url: str  # postgresql://user@host:port/db (any driver prefix is replaced)
    safe: bool = False
    application_name: str = "otel-disconnect-demo"
    pool_size: int = 30


def async_url(url: str) -> str:
    """The asyncpg flavour of a PostgreSQL URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("postgres"):
        raise ValueError(f"not a postgresql:// URL: {url!r}")
    return f"postgresql+asyncpg://{rest}"


def libpq_url(url: str) -> str:
    return "postgresql://" + url.partition("://")[2]


async def create_schema(engine: Any) -> None:
    from sqlalchemy import text

    async with engine.begin() as conn:
        for statement in SCHEMA:
            await conn.execute(text(statement))


def _sse_text(line: str) -> str:
    """The content of one OpenAI SSE ``data:`` line ('' for anything else)."""
    if not line.startswith("data:") or line.endswith("[DONE]"):
        return ""
    try:
        choices = json.loads(line[5:]).get("choices") or ()
    except ValueError:
        return ""
    parts = [(c.get("delta") or {}).get("content") or "" for c in choices if isinstance(c, dict)]
    return "".join(parts)


def create_app_from_env() -> Any:
    """``otel-disconnect demo --serve --workers N``: one gateway per uvicorn worker."""
    import os

    return create_app(GatewayConfig(
        llm_url=os.environ["OTEL_DISCONNECT_DEMO_LLM_URL"],
        database_url=os.environ["OTEL_DISCONNECT_DEMO_DATABASE_URL"],
        safe=bool(os.environ.get("OTEL_DISCONNECT_DEMO_SAFE")),
    ))


def create_app(config: GatewayConfig, *, registry: Any = None, tracer_provider: Any = None,
               collector: bool = True) -> Any:
    """The gateway, instrumented, with ``/metrics`` (and pg_stat_activity when ``collector``)."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

    engine = create_async_engine(
        async_url(config.database_url), pool_size=config.pool_size, max_overflow=10,
        pool_timeout=10,
        connect_args={"server_settings": {"application_name": config.application_name}},
    )
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await create_schema(engine)
        state["http"] = httpx.AsyncClient(
            base_url=config.llm_url, timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=5.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        try:
            yield
        finally:
            await state["http"].aclose()
            await engine.dispose()
            if "collector" in state:
                state["collector"].close()

    app = FastAPI(title="otel-disconnect demo chat gateway", lifespan=lifespan)

    def upstream(chat: ChatRequest) -> Any:
        body = {"model": chat.model, "messages": [m.model_dump() for m in chat.messages],
                "stream": True, "stream_options": {"include_usage": True}}
        if chat.max_tokens is not None:
            body["max_tokens"] = chat.max_tokens
        return state["http"].stream("POST", ROUTE, json=body)

    async def commit(tx: Any) -> None:
        if config.safe:
            # The client may leave now; the answer it paid for is stored either way.
            async with protect("commit"):
                await tx.commit()
        else:
            await tx.commit()

    async def save_answer(conn: AsyncConnection, chat: ChatRequest, answer: str) -> None:
        await conn.execute(text(INSERT_MESSAGE),
                           {"user": chat.user, "role": "assistant", "content": answer})
        await conn.execute(text(CHARGE), {"user": chat.user, "tokens": len(answer.split())})

    async def begin(conn: AsyncConnection, chat: ChatRequest) -> Any:
        tx = await conn.begin()
        prompt = chat.messages[-1].content if chat.messages else ""
        await conn.execute(text(INSERT_MESSAGE),
                           {"user": chat.user, "role": "user", "content": prompt})
        return tx

    @asynccontextmanager
    async def transaction(chat: ChatRequest) -> AsyncIterator[tuple[AsyncConnection, Any]]:
        async with engine.connect() as conn:
            tx = await begin(conn, chat)
            try:
                yield conn, tx
            except BaseException:
                if config.safe and tx.is_active:
                    # A rollback that is itself cancelled half-way costs the connection; one
                    # round trip, shielded, returns it to the pool clean.
                    async with protect("rollback"):
                        await tx.rollback()
                raise

    async def complete(chat: ChatRequest) -> JSONResponse:
        async with transaction(chat) as (conn, tx):
            # The transaction stays open while the model answers: the common shape, and the
            # one that leaves backends idle in transaction for clients that are gone.
            pieces: list[str] = []
            async with upstream(chat) as response:
                async for line in response.aiter_lines():
                    pieces.append(_sse_text(line))
            answer = "".join(pieces)
            await save_answer(conn, chat, answer)
            await commit(tx)
        return JSONResponse({
            "object": "chat.completion", "model": chat.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
        })

    def stream(chat: ChatRequest) -> StreamingResponse:
        producer: dict[str, asyncio.Task[None]] = {}

        async def produce(queue: asyncio.Queue[str | None]) -> None:
            try:
                async with upstream(chat) as response:
                    async for line in response.aiter_lines():
                        if line:
                            queue.put_nowait(line)
            except httpx.HTTPError:
                pass  # the upstream went away: the stream ends short
            finally:
                queue.put_nowait(None)

        async def events() -> AsyncIterator[str]:
            async with transaction(chat) as (conn, tx):
                queue: asyncio.Queue[str | None] = asyncio.Queue()
                producer["task"] = asyncio.create_task(produce(queue))
                pieces: list[str] = []
                while (line := await queue.get()) is not None:
                    pieces.append(_sse_text(line))
                    yield line + "\n\n"
                await save_answer(conn, chat, "".join(pieces))
                await commit(tx)

        async def stop_producer(end: str) -> None:
            task = producer.get("task")
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

        body = guard_stream(events(), on_close=stop_producer) if config.safe else events()
        return StreamingResponse(body, media_type="text/event-stream")

    @app.post(ROUTE)
    async def chat_completions(chat: ChatRequest) -> Any:
        return stream(chat) if chat.stream else await complete(chat)

    @app.get("/health")
    async def health(request: Request) -> dict[str, str]:
        return {"status": "ok"}

    instrument_app(app, engines=[engine], cancel_on_disconnect=config.safe, registry=registry,
                   tracer_provider=tracer_provider)
    if collector:

        pg = PgActivityCollector(
            libpq_url(config.database_url), registry=registry, metrics="prometheus",
            application_name=f"{config.application_name}-monitor",
        )
        state["collector"] = pg
    app.state.engine = engine
    return app
