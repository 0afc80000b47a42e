"""The demo's pieces for the probe tests: one PostgreSQL and one LLM simulator per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from otel_disconnect.tools.demo.postgres import EmbeddedPostgres
from otel_disconnect.tools.demo.serving import Server


@pytest.fixture(scope="session")
def demo_pg() -> Iterator[str]:
    server = EmbeddedPostgres()
    try:
        server.start()
        yield server.url()
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def llm_url() -> Iterator[str]:
    from otel_disconnect.tools.llm_sim import SimConfig, create_app

    server = Server(create_app(SimConfig(ttft=0.4, tokens_per_second=40, max_tokens=4000)))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
