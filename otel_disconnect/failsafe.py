"""Fail open: an error inside otel-disconnect is counted and logged once per kind, never raised."""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Any

from prometheus_client import CollectorRegistry

from .telemetry.metrics import metrics_for

logger = logging.getLogger("otel_disconnect")

_logged: set[str] = set()
_lock = threading.Lock()


def internal_error(
    where: str, registry: CollectorRegistry | None = None, *, metrics: Any = None
) -> None:
    """Record the exception being handled; call it from an ``except`` block.

    Counted where the component that had it counts: ``metrics`` (a request's sink,
    ``state.metrics``) when given, else the metrics of ``registry`` (None: the global one).
    """
    try:
        (metrics or metrics_for(registry)).internal_errors.labels(where).inc()
        with _lock:
            first = where not in _logged
            _logged.add(where)
        if first:
            # The traceback as text, not exc_info: a handler that keeps records (a test's log
            # capture, a buffering handler) would otherwise keep the failed request's frames,
            # and with them its state, scope and span, alive.
            logger.error(
                "otel-disconnect internal error in %s (the app is unaffected)\n%s",
                where,
                traceback.format_exc().rstrip(),
            )
    except Exception:  # pragma: no cover - the last line of defence must not raise
        pass
