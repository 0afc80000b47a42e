"""Which ASGI servers' ``receive()`` the read-ahead may step by hand.

The read-ahead drives a pending ``receive()`` coroutine the way ``asyncio.Task`` would, without
a task per request. That is only sound for a coroutine that awaits nothing but asyncio futures:
the servers' own receive methods (uvicorn's and Granian's protocol methods, Hypercorn's
``asyncio.Queue.get``). They are recognised by the class that owns the bound method; anything
else (a receive wrapped by a middleware, a test transport) is read in a real task, the public
and always-correct fallback.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Module prefixes of the servers whose receive methods only await futures.
SERVER_MODULES = ("uvicorn.", "granian.")

_by_type: dict[type, bool] = {}


def drivable(receive: Any) -> bool:
    """True when ``receive`` is a server's own, which only awaits asyncio-style futures."""
    owner = getattr(receive, "__self__", None)
    if owner is None:
        return False
    kind = type(owner)
    found = _by_type.get(kind)
    if found is None:
        # Hypercorn hands the app ``app_queue.get``; uvicorn and Granian their protocol's method.
        found = isinstance(owner, asyncio.Queue) or (kind.__module__ or "").startswith(
            SERVER_MODULES
        )
        if len(_by_type) < 64:  # bounded: one entry per receive-owning class seen
            _by_type[kind] = found
    return found
