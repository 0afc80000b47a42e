"""Shortcuts through SQLAlchemy internals: the pool entry's ``info`` behind a connection.

The engine hooks keep their per-connection state in the pool entry's ``info`` dict (put there
by the public ``checkout`` pool event). The dialect methods they wrap get the checked-out
``PoolProxiedConnection``, and ``do_execute`` an execution context. Reaching the dict through
the private ``_connection_record`` and ``_dbapi_connection`` costs two attribute reads; the
public ``PoolProxiedConnection.info`` and ``ExecutionContext.connection.connection`` cost
property calls: about 4,800 instructions more per transaction of begin, one statement and
commit, 2.4% of all it costs on SQLite (callgrind, ``PYTHONHASHSEED=0``, 1,000 transactions).
The shortcut is taken while it works: the first sign that the private layout is gone switches this
process to the public path for good.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.pool import PoolProxiedConnection


class Layout:
    # False once the private layout was not there (tests/test_compat.py checks it stays True).
    fast = True


def entry_info(proxied: Any) -> dict[Any, Any] | None:
    """The pool entry's ``info`` of a checked-out connection; None once it is detached."""
    if Layout.fast:
        try:
            record = proxied._connection_record
            return record.info if record is not None else None
        except AttributeError:
            # A raw DBAPI connection on some odd path has none either: only SQLAlchemy's own
            # proxy without the attribute means the layout changed.
            if isinstance(proxied, PoolProxiedConnection):
                Layout.fast = False
    info = proxied.info  # a detached connection's is a fresh empty dict
    return info if type(info) is dict else None


def context_entry_info(context: Any) -> dict[Any, Any] | None:
    """``entry_info`` of the connection an execution context runs on."""
    if Layout.fast:
        try:
            record = context._dbapi_connection._connection_record
            return record.info if record is not None else None
        except AttributeError:
            if not hasattr(context, "_dbapi_connection"):
                Layout.fast = False
    return entry_info(context.connection.connection)
