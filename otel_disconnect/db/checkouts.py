"""The process-wide table of pooled connections checked out right now, and who holds them.

Written by the engine hooks at check-out and check-in; read by the PostgreSQL collector to say
which ``idle in transaction`` backend belongs to a request that ended or whose client left.
Plain dict operations: atomic under the GIL, so the collector's thread needs no lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import ConnState

_by_record: dict[int, ConnState] = {}


def add(record_id: int, conn: ConnState) -> None:
    _by_record[record_id] = conn


def get(record_id: int) -> ConnState | None:
    return _by_record.get(record_id)


def pop(record_id: int) -> ConnState | None:
    return _by_record.pop(record_id, None)


def by_pid() -> dict[int, ConnState]:
    """Checked-out PostgreSQL connections by backend pid (a copy, safe to iterate)."""
    return {conn.pid: conn for conn in _by_record.copy().values() if conn.pid is not None}
