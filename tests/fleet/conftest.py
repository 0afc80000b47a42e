from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import require_binary
from ..db.conftest import pg_url  # noqa: F401 - the session's PostgreSQL, for the orphan test
from .redis_server import RedisServer

pytest.importorskip("redis")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    # A short directory: a Unix socket path must stay under 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="od-redis-"))
    server = RedisServer(require_binary("redis-server"), directory).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
