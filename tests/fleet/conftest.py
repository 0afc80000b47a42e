from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..db.conftest import pg_url  # noqa: F401 - the session's PostgreSQL, for the orphan test
from .redis_server import RedisServer, running_redis

pytest.importorskip("redis")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server
