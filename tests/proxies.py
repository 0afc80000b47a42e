"""Real reverse proxies (the Debian nginx, haproxy and caddy binaries) in front of a test server.

``run_proxy("nginx", upstream_port, settings="streaming")`` writes the proxy's own config into a
temp dir, starts the binary in the foreground on a free loopback port, waits (with a deadline)
until it accepts connections, and stops only that process, by its PID, on exit. Without the
binary the test is skipped, except under ``CI=true``, where it fails.

Each proxy has named settings (``SETTINGS``): its default configuration and the variants people
use for LLM streaming. ``extra`` adds directives to the proxied location (nginx ``location``,
HAProxy ``backend``, Caddy ``reverse_proxy`` block), e.g.
``extra=["proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"]`` or
``extra=["option forwardfor"]`` or ``extra=["header_up X-Forwarded-For {remote_host}"]``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import require_binary
from tests.servers import _port_open, free_port

PROXIES = ("nginx", "haproxy", "caddy")

# What each named setting adds to the proxy's default configuration.
SETTINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "nginx": {
        # nginx as installed: HTTP/1.0 to the upstream, response and request buffering on.
        "default": (),
        # What LLM-streaming guides say: no response buffering, HTTP/1.1 with upstream keep-alive,
        # request bodies passed on as they arrive.
        "streaming": (
            "proxy_buffering off;",
            "proxy_request_buffering off;",
            "proxy_http_version 1.1;",
            'proxy_set_header Connection "";',
        ),
        # The same, and nginx keeps the upstream request running when the client aborts.
        "ignore_client_abort": (
            "proxy_buffering off;",
            "proxy_request_buffering off;",
            "proxy_http_version 1.1;",
            'proxy_set_header Connection "";',
            "proxy_ignore_client_abort on;",
        ),
    },
    "haproxy": {
        # HAProxy 2.x default: keep-alive on both sides.
        "default": (),
        "http-server-close": ("option http-server-close",),
        "abortonclose": ("option abortonclose",),
    },
    "caddy": {
        "default": (),
        # Flush every write to the client at once (Caddy's switch for streaming).
        "flush": ("flush_interval -1",),
    },
}


@dataclass
class Proxy:
    kind: str
    settings: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    config: str
    argv: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self) -> str:
        path = self.workdir / "proxy.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _nginx_config(port: int, upstream: int, directives: Sequence[str], workdir: Path) -> str:
    keepalive = any("proxy_http_version 1.1" in d for d in directives)
    lines = "\n            ".join(directives)
    return f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/proxy.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    upstream app {{
        server 127.0.0.1:{upstream};
        {"keepalive 8;" if keepalive else ""}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            {lines}
        }}
    }}
}}
"""


def _haproxy_config(port: int, upstream: int, directives: Sequence[str], workdir: Path) -> str:
    lines = "\n    ".join(directives)
    return f"""
global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    {lines}
    server app 127.0.0.1:{upstream}
"""


def _caddy_config(port: int, upstream: int, directives: Sequence[str], workdir: Path) -> str:
    lines = "\n        ".join(directives)
    return f"""{{
    admin off
    auto_https off
    log {{
        output file {workdir}/proxy.log
        level WARN
    }}
}}
http://127.0.0.1:{port} {{
    reverse_proxy 127.0.0.1:{upstream} {{
        {lines}
    }}
}}
"""


def _argv(kind: str, binary: str, config_path: Path, workdir: Path) -> list[str]:
    if kind == "nginx":
        return [
            binary,
            "-p",
            str(workdir),
            "-c",
            str(config_path),
            "-e",
            str(workdir / "proxy.log"),
        ]
    if kind == "haproxy":
        return [binary, "-db", "-f", str(config_path)]
    return [binary, "run", "--config", str(config_path), "--adapter", "caddyfile"]


_CONFIGS = {"nginx": _nginx_config, "haproxy": _haproxy_config, "caddy": _caddy_config}


def _start(
    kind: str,
    binary: str,
    upstream_port: int,
    *,
    directives: Sequence[str],
    workdir: Path,
    settings: str,
    timeout: float,
) -> Proxy:
    port = free_port()
    config = _CONFIGS[kind](port, upstream_port, directives, workdir)
    config_path = workdir / {"nginx": "nginx.conf", "haproxy": "haproxy.cfg"}.get(kind, "Caddyfile")
    config_path.write_text(config)
    argv = _argv(kind, binary, config_path, workdir)
    env = dict(
        os.environ,
        HOME=str(workdir),
        XDG_DATA_HOME=str(workdir / "data"),
        XDG_CONFIG_HOME=str(workdir / "config"),
    )
    log = (workdir / "stdout.log").open("ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    log.close()
    proxy = Proxy(kind, settings, port, workdir, proc, config, argv)
    deadline = time.monotonic() + timeout
    while not _port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proxy)
            output = (workdir / "stdout.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{kind} did not start on {port}:\n{output}\n{proxy.log_tail()}")
        time.sleep(0.02)
    return proxy


def _stop(proxy: Proxy) -> None:
    if proxy.proc.poll() is None:
        # SIGTERM to this PID only: nginx's master then stops its own worker.
        proxy.proc.send_signal(signal.SIGTERM)
        try:
            proxy.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.proc.kill()
            proxy.proc.wait(timeout=10)


@contextlib.contextmanager
def run_proxy(
    kind: str,
    upstream_port: int,
    settings: str = "default",
    extra: Sequence[str] = (),
    timeout: float = 20.0,
) -> Iterator[Proxy]:
    """A real ``kind`` proxy on a free loopback port forwarding to ``127.0.0.1:upstream_port``."""
    if kind not in SETTINGS:
        raise ValueError(f"unknown proxy {kind!r}; one of {PROXIES}")
    if settings not in SETTINGS[kind]:
        raise ValueError(f"unknown {kind} settings {settings!r}; one of {tuple(SETTINGS[kind])}")
    binary = require_binary(kind)
    directives = (*SETTINGS[kind][settings], *extra)
    with tempfile.TemporaryDirectory(prefix=f"{kind}-") as tmp:
        workdir = Path(tmp)
        # A port picked free can be taken by another process before the proxy binds it: retry.
        for attempt in range(3):
            try:
                proxy = _start(
                    kind,
                    binary,
                    upstream_port,
                    directives=directives,
                    workdir=workdir,
                    settings=settings,
                    timeout=timeout,
                )
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        try:
            yield proxy
        finally:
            _stop(proxy)
