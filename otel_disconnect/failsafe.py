"""Fail open: an error inside otel-disconnect is counted and logged once per kind, never raised."""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry

from .telemetry.metrics import metrics_for

logger = logging.getLogger("otel_disconnect")

_logged: set[str] = set()
_lock = threading.Lock()


def internal_error(where: str, registry: CollectorRegistry | None = None) -> None:
    """Record the exception being handled; call it from an ``except`` block."""
    try:
        metrics_for(registry).internal_errors.labels(where).inc()
        with _lock:
            first = where not in _logged
            _logged.add(where)
        if first:
            logger.exception("otel-disconnect internal error in %s (the app is unaffected)", where)
    except Exception:  # pragma: no cover - the last line of defence must not raise
        pass
