"""The events on a fleet's Redis stream: small JSON objects, one field ``e`` per stream entry.

Every event names its format version, fleet and the process that sent it, so a reader drops its
own echoes, another fleet's events and anything malformed (each counted) without trusting it.

- ``r`` retry: a premature disconnect; ``fp`` the request's 8-byte retry fingerprint (hex),
  ``t`` when it was seen (wall clock), ``w`` the sender's retry window, ``s`` when that request
  began (wall clock; optional);
- ``o`` orphan: a connection held in a transaction by a request whose client left
  (``own="disconnected"``) or that ended (``own="ended"``): ``db`` database name, ``pid``
  backend pid, ``tid`` trace id, ``route``;
- ``x`` over: that connection went back to its pool (or was closed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VERSION = 1
FIELD = b"e"
OWNERS = ("ended", "disconnected")
MAX_EVENT_BYTES = 2048


class Malformed(ValueError):
    """Not an event of ours (wrong shape, version or types)."""


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "r" | "o" | "x"
    fleet: str
    origin: str
    t: float
    fp: bytes = b""
    window_s: float = 0.0
    started: float | None = None  # r: when the disconnected request began
    db: str = ""
    pid: int = 0
    owner: str = ""
    trace_id: str = ""
    route: str = ""


def retry(
    fleet: str, origin: str, fp: bytes, t: float, window_s: float, *, started: float | None = None
) -> bytes:
    obj = {"v": VERSION, "k": "r", "f": fleet, "o": origin, "t": t, "fp": fp.hex(), "w": window_s}
    if started is not None:
        obj["s"] = started
    return _dump(obj)


def orphan(
    fleet: str, origin: str, t: float, *, db: str, pid: int, owner: str, trace_id: str, route: str
) -> bytes:
    return _dump(
        {
            "v": VERSION,
            "k": "o",
            "f": fleet,
            "o": origin,
            "t": t,
            "db": db,
            "pid": pid,
            "own": owner,
            "tid": trace_id,
            "route": route,
        }
    )


def over(fleet: str, origin: str, t: float, db: str, pid: int) -> bytes:
    return _dump({"v": VERSION, "k": "x", "f": fleet, "o": origin, "t": t, "db": db, "pid": pid})


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def parse(raw: Any) -> Event:
    """One stream entry's ``e`` field; raises Malformed for anything not exactly ours."""
    if not isinstance(raw, bytes | str) or len(raw) > MAX_EVENT_BYTES:
        raise Malformed("not a short string")
    try:
        obj = json.loads(raw)
    except ValueError:
        raise Malformed("not JSON") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise Malformed("unknown version")
    kind, fleet, origin, t = obj.get("k"), obj.get("f"), obj.get("o"), obj.get("t")
    if not (isinstance(fleet, str) and isinstance(origin, str) and isinstance(t, int | float)):
        raise Malformed("missing fleet, origin or time")
    if kind == "r":
        fp, window, started = obj.get("fp"), obj.get("w"), obj.get("s")
        if not (isinstance(fp, str) and len(fp) == 16 and isinstance(window, int | float)):
            raise Malformed("bad retry event")
        if started is not None and not isinstance(started, int | float):
            raise Malformed("bad retry event")
        try:
            digest = bytes.fromhex(fp)
        except ValueError:
            raise Malformed("bad fingerprint") from None
        return Event(
            "r", fleet, origin, float(t), fp=digest, window_s=float(window),
            started=None if started is None else float(started),
        )
    db, pid = obj.get("db"), obj.get("pid")
    if not (isinstance(db, str) and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0):
        raise Malformed("bad database or pid")
    if kind == "x":
        return Event("x", fleet, origin, float(t), db=db, pid=pid)
    if kind == "o":
        owner, tid, route = obj.get("own"), obj.get("tid"), obj.get("route")
        if owner not in OWNERS or not isinstance(tid, str) or not isinstance(route, str):
            raise Malformed("bad orphan event")
        return Event(
            "o", fleet, origin, float(t), db=db, pid=pid, owner=owner, trace_id=tid, route=route
        )
    raise Malformed("unknown kind")
