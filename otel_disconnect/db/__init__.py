"""Database integrations: SQLAlchemy engine hooks and the PostgreSQL activity collector.

Both import SQLAlchemy / psycopg lazily, so the core package works without them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PgActivityCollector", "instrument_engine"]


def __getattr__(name: str) -> Any:
    if name == "instrument_engine":
        from .engine import instrument_engine

        return instrument_engine
    if name == "PgActivityCollector":
        from .pg_activity import PgActivityCollector

        return PgActivityCollector
    raise AttributeError(name)
