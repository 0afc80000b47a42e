"""A real ``redis-server`` (the Debian package) on a Unix socket in a temporary directory.

Started and stopped by PID; ``kill()`` and ``start()`` again reuse the same socket path, so a
client configured with the URL sees a restart, as in production. Nothing is persisted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..conftest import require_binary
from ..servers import wait_for


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A started server in a new temporary directory; stopped (by PID) and removed after.
    Skips without the Debian ``redis-server``, except under CI=true."""
    binary = require_binary("redis-server")
    # A short directory: a Unix socket path must stay under 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="od-redis-"))
    server = RedisServer(binary, directory).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


class RedisServer:
    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", "0", "--unixsocket", str(self.socket),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
        )
        wait_for(self.ping, timeout=20)
        return self

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def commands(self) -> dict[str, int]:
        """Calls per command since start (``INFO commandstats``), e.g. ``{"xadd": 3}``."""
        stats = self.client().info("commandstats")
        return {key.removeprefix("cmdstat_"): int(v["calls"]) for key, v in stats.items()}

    def kill(self) -> None:
        """SIGKILL: the abrupt failure (no goodbye to clients), then wait until it is gone."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
            self.proc = None
        self.socket.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None
