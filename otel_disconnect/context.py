"""Which request is running: the one ContextVar that carries its ``RequestState``.

The middleware sets it for the app's task (``set_current`` / ``reset_current``); asyncio copies
it into every task the app starts, so token sources and database hooks find their request with
``current_state()`` wherever the work runs. An integration that carries a request's work to
another context by hand (a thread, a callback of an engine loop) sets it there the same way.
Apps get the read-only view: ``current()``, or the ``client_state`` dependency.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

from ._types import Scope
from .state import RequestState, RequestView

_current: ContextVar[RequestState | None] = ContextVar("otel_disconnect_request", default=None)

# The record of the running request, or None outside one (the package's own readers).
current_state = _current.get


def set_current(state: RequestState | None) -> Token[RequestState | None]:
    """Make ``state`` the running request in this context; returns the token to reset it."""
    return _current.set(state)


def reset_current(token: Token[RequestState | None]) -> None:
    """Undo the ``set_current`` that returned ``token``."""
    _current.reset(token)


def current() -> RequestView | None:
    """The running request, read-only, or None outside a request the middleware sees."""
    state = _current.get()
    return state.view() if state is not None else None


_DETACHED_SCOPE: Scope = {"type": "http", "method": "GET"}


async def client_state() -> RequestView:
    """FastAPI dependency: ``state: RequestView = Depends(client_state)``.

    Async on purpose: FastAPI runs sync dependencies in a thread pool, and this is a lookup.

    It reads the ContextVar the middleware set, so it works behind ``BaseHTTPMiddleware`` (whose
    ``Request.is_disconnected()`` never turns True). Without the middleware it returns a view of
    a request that never disconnects instead of failing the request.
    """
    state = _current.get()
    if state is None:
        state = RequestState(_DETACHED_SCOPE)
    return state.view()
