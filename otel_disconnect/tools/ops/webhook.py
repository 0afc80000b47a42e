"""A minimal Alertmanager webhook receiver that logs every alert as one JSON line.

The compose stack's Alertmanager sends here (``docker compose logs alert-log``); the end-to-end
test uses it to see which alerts arrived. ``otel-disconnect webhook --port 9099``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

MAX_BODY = 4 * 1024 * 1024


class AlertLog:
    """Receives Alertmanager notifications on ``host:port`` (0 picks a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, out: TextIO | None = None) -> None:
        self.alerts: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._out = out
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.alerts)

    def _record(self, notification: dict[str, Any]) -> None:
        alerts = [a for a in notification.get("alerts", []) if isinstance(a, dict)]
        with self._lock:
            self.alerts.extend(alerts)
        if self._out is not None:
            for alert in alerts:
                self._out.write(json.dumps(alert, sort_keys=True) + "\n")
            self._out.flush()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        log = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    self.send_response(400)
                    self.end_headers()
                    return
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                if isinstance(body, dict):
                    log._record(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return  # one JSON line per alert is the log

        return Handler

    def start(self) -> AlertLog:
        self._thread = threading.Thread(target=self.server.serve_forever, name="alert-log",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
