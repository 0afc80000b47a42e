"""Safe cancellation: ``protect()`` sections and ``guard_stream()`` cleanup.

Cancellation on disconnect (``cancel_on_disconnect``) runs the app inside an anyio cancel scope,
so it reaches the child tasks Starlette streams in and respects anyio shields. ``protect()`` is
such a shield plus a note in the request state that defers our own cancellation until the block
exits; ``guard_stream()`` runs cleanup once, shielded, whichever way a stream ends.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio

from .context import current_state
from .errors import ClientDisconnected, is_disconnect_error
from .state import RequestState

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

END_COMPLETED = "completed"
END_CLIENT_DISCONNECT = "client_disconnect"
END_APP_BREAK = "app_break"
END_ERROR = "error"


class protect:
    """``async with protect("commit"):`` or ``@protect("commit")``.

    The body is never interrupted by disconnect cancellation: neither otel-disconnect's
    ``cancel_on_disconnect`` nor Starlette's (anyio) cancellation of a stream whose client left.
    A cancellation that arrives inside is delivered when the block exits. The name is recorded
    as ``disconnect.protected_section`` when the client leaves inside it.

    The decorator form runs the function in a shielded task, so it also survives a plain
    ``task.cancel()`` from elsewhere (vLLM's ``with_cancellation``, say); the ``async with`` form
    cannot move its body into another task, so only anyio and otel-disconnect cancellation wait.
    """

    __slots__ = ("_name", "_scope", "_state")

    def __init__(self, name: str = "protected") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("protect() needs a non-empty section name")
        self._name = name
        self._state: RequestState | None = None
        self._scope: anyio.CancelScope | None = None

    async def __aenter__(self) -> protect:
        if self._scope is not None:
            raise RuntimeError("a protect() object is not reentrant; create one per block")
        self._state = current_state()
        if self._state is not None:
            self._state.enter_protected(self._name)
        self._scope = anyio.CancelScope(shield=True)
        self._scope.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        scope, self._scope = self._scope, None
        state, self._state = self._state, None
        assert scope is not None
        scope.__exit__(exc_type, exc, tb)
        if state is not None:
            state.exit_protected()  # releases a cancel_on_disconnect that waited for us
        if exc_type is None:
            # Any cancellation that waited for this block is delivered here, at its exit.
            await anyio.lowlevel.checkpoint_if_cancelled()
        return False

    def __call__(self, fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError("@protect() decorates async functions")
        name = self._name

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            async def body() -> Any:
                async with protect(name):
                    return await fn(*args, **kwargs)

            return await _run_shielded(body())

        return cast(F, wrapper)


async def _run_shielded(coro: Awaitable[T]) -> T:
    """Await ``coro`` in its own task; a cancellation of the caller waits for it to finish and is
    re-raised afterwards. Not on asyncio (trio): awaited in place, where protect()'s anyio
    shield is what holds off a cancellation."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return await coro
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def guard_stream(
    agen: AsyncIterable[T],
    *,
    on_close: Callable[[str], Any] | None = None,
) -> AsyncGenerator[T, None]:
    """Wrap a stream so that its cleanup runs exactly once, shielded, however it ends.

    ``on_close(end)`` (sync or async) runs after the wrapped generator is closed, and gets:
    ``completed`` (it ran out, client still there), ``app_break`` (it stopped early by itself,
    for instance after checking ``current().disconnected``, or its consumer stopped reading with
    the client still there), ``client_disconnect`` (the framework cancelled or closed it, or
    ``send`` failed, after the client left) or ``error``. Recorded as ``disconnect.stream_end``.
    """
    return _guarded(agen, on_close, current_state())


async def _guarded(
    agen: AsyncIterable[T], on_close: Callable[[str], Any] | None, state: RequestState | None
) -> AsyncGenerator[T, None]:
    end: str | None = None
    try:
        async for item in agen:
            yield item
        # The stream ran out by itself: completed, unless it stopped because the client left.
        end = (
            END_APP_BREAK
            if state is not None and state.detected_perf is not None
            else END_COMPLETED
        )
    except (asyncio.CancelledError, GeneratorExit, ClientDisconnected):
        # Cancelled or closed by the framework (or send failed) while the client is gone; a
        # consumer that simply stops reading without a disconnect broke off the stream.
        end = END_CLIENT_DISCONNECT if _client_gone(state) else END_APP_BREAK
        raise
    except BaseException as exc:
        gone = is_disconnect_error(exc) and _client_gone(state)
        end = END_CLIENT_DISCONNECT if gone else END_ERROR
        raise
    finally:
        await _finish(agen, on_close, state, end or END_CLIENT_DISCONNECT)


def _client_gone(state: RequestState | None) -> bool:
    return state is None or state.detected_perf is not None


async def _finish(
    agen: AsyncIterable[Any],
    on_close: Callable[[str], Any] | None,
    state: RequestState | None,
    end: str,
) -> None:
    if state is not None and state.stream_end is None:
        state.stream_end = end

    async def cleanup() -> None:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            await aclose()
        if on_close is not None:
            result = on_close(end)
            if inspect.isawaitable(result):
                await result

    # Shielded twice over: from anyio cancellation (Starlette) and from a plain task.cancel().
    with anyio.CancelScope(shield=True):
        await _run_shielded(cleanup())
