"""Shortcuts through SQLAlchemy internals: the pool entry's ``info`` behind a connection.

The engine hooks keep their per-connection state in the pool entry's ``info`` dict (put there
by the public ``checkout`` pool event). The dialect methods they wrap get the checked-out
``PoolProxiedConnection``, and ``do_execute`` an execution context. Through the private
``_connection_record`` and ``_dbapi_connection`` the dict is one C-level ``attrgetter`` call
away; through the public ``PoolProxiedConnection.info`` and
``ExecutionContext.connection.connection`` it is three Python property calls, some 4,800
instructions more per transaction of begin, one statement and commit (2.4% of all it costs on
SQLite; callgrind, ``PYTHONHASHSEED=0``). The layout is checked once, at import: the slot on
SQLAlchemy's connection proxy and the attribute its execution context declares.

Both getters raise ``AttributeError`` for a connection no longer in the pool (detached).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from types import MemberDescriptorType
from typing import Any


def _private_layout() -> bool:
    try:
        from sqlalchemy.engine.default import DefaultExecutionContext
        from sqlalchemy.pool.base import _ConnectionFairy

        slot = _ConnectionFairy.__dict__.get("_connection_record")
        return isinstance(slot, MemberDescriptorType) and (
            "_dbapi_connection" in DefaultExecutionContext.__annotations__
        )
    except Exception:
        return False


def _public_entry_info(proxied: Any) -> dict[Any, Any]:
    if proxied.is_detached:
        raise AttributeError("detached from its pool")
    info: dict[Any, Any] = proxied.info
    return info


def _public_context_entry_info(context: Any) -> dict[Any, Any]:
    return _public_entry_info(context.connection.connection)


# tests/test_compat.py checks that this is True on the supported versions.
FAST = _private_layout()

entry_info: Callable[[Any], dict[Any, Any]] = (
    attrgetter("_connection_record.info") if FAST else _public_entry_info
)
"""The pool entry's ``info`` of a checked-out connection (a ``PoolProxiedConnection``)."""

context_entry_info: Callable[[Any], dict[Any, Any]] = (
    attrgetter("_dbapi_connection._connection_record.info") if FAST else _public_context_entry_info
)
"""``entry_info`` of the connection an execution context runs on."""
