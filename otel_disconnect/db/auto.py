"""Instrument every SQLAlchemy engine created after start-up (for ``DisconnectInstrumentor``).

Wraps ``create_engine`` wherever SQLAlchemy exposes it, the way opentelemetry-instrumentation-
sqlalchemy does; ``create_async_engine`` builds its engine through the wrapped one. Raises
ImportError without SQLAlchemy, so the caller can skip it.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from prometheus_client import CollectorRegistry

from ..failsafe import internal_error
from .engine import instrument_engine

# (module, attribute) pairs that hold SQLAlchemy's create_engine.
_TARGETS = (
    ("sqlalchemy", "create_engine"),
    ("sqlalchemy.engine", "create_engine"),
    ("sqlalchemy.engine.create", "create_engine"),
    ("sqlalchemy.ext.asyncio.engine", "_create_engine"),
)

_originals: dict[tuple[str, str], Any] = {}


def install(registry: CollectorRegistry | None = None) -> None:
    import sqlalchemy  # noqa: F401  (ImportError: SQLAlchemy is optional)

    if _originals:
        return
    for module_name, attribute in _TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # sqlalchemy.ext.asyncio needs greenlet
            continue
        original = getattr(module, attribute, None)
        if original is None:
            continue
        _originals[(module_name, attribute)] = original
        setattr(module, attribute, _wrap(original, registry))


def uninstall() -> None:
    for (module_name, attribute), original in _originals.items():
        setattr(importlib.import_module(module_name), attribute, original)
    _originals.clear()


def _wrap(create_engine: Any, registry: CollectorRegistry | None) -> Any:
    @functools.wraps(create_engine)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        engine = create_engine(*args, **kwargs)
        try:
            instrument_engine(engine, registry=registry)
        except Exception:
            internal_error("db_auto_instrument", registry)
        return engine

    wrapper.__wrapped_by_otel_disconnect__ = True  # type: ignore[attr-defined]
    return wrapper
