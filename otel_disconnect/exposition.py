"""``metrics_app()``: the Prometheus exposition as an ASGI app, multi-process aware."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app

from ._types import Receive, Scope, Send
from .telemetry.metrics import multiprocess_mode


class _MetricsApp:
    """A class, not a function, so that Starlette's ``Route`` serves it as a raw ASGI app."""

    def __init__(self, registry: CollectorRegistry, multiproc_dir: str | None = None) -> None:
        self._app: Any = make_asgi_app(registry)
        self._dir = multiproc_dir

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._dir is not None and scope.get("type") == "http":
            from .telemetry.multiproc import sweep_dead_workers

            sweep_dead_workers(self._dir)  # a few stat calls: uvicorn never reports dead workers
        await self._app(scope, receive, send)


def metrics_app(registry: CollectorRegistry | None = None) -> _MetricsApp:
    """Serve ``registry`` (default: the global one; with ``PROMETHEUS_MULTIPROC_DIR`` set, every
    worker's metrics plus this process's scrape-time collectors, such as the PostgreSQL one)."""
    if registry is None:
        if multiprocess_mode():
            from .telemetry.multiproc import MultiprocessExposition, mark_dead_at_exit

            path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
            registry = CollectorRegistry()
            registry.register(MultiprocessExposition(REGISTRY, path))
            mark_dead_at_exit(path)
            return _MetricsApp(registry, path)
        registry = REGISTRY
    return _MetricsApp(registry)
