"""``metrics_app()``: the Prometheus exposition as an ASGI app, multi-process aware."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app

from ._types import Receive, Scope, Send
from .telemetry.metrics import multiprocess_mode


class _MetricsApp:
    """A class, not a function, so that Starlette's ``Route`` serves it as a raw ASGI app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._app: Any = make_asgi_app(registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def metrics_app(registry: CollectorRegistry | None = None) -> _MetricsApp:
    """Serve ``registry`` (default: the global one, or every worker's values when
    ``PROMETHEUS_MULTIPROC_DIR`` is set)."""
    if registry is None:
        if multiprocess_mode():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
    return _MetricsApp(registry)
