"""Watch for ``http.disconnect`` without taking messages from the app, and without a task.

A handler that never calls ``receive()`` (a GET, a handler awaiting an LLM) never learns that its
client left: the server only reports it through ``receive()``. So the pump reads ahead: it keeps
one ``receive()`` pending for the whole request, buffers what it reads (request body chunks, at
most ``BUFFER_LIMIT`` bytes before it pauses), and hands those messages to the app's own
``receive()`` calls in order. ``http.disconnect`` is replayed to every later ``receive()``, which
also evens out Hypercorn (delivers it once) and uvicorn (repeats it).

The pending read is driven the way ``asyncio.Task`` drives a coroutine (step it, park a callback on
the future it yields), but without creating a Task for it: the server's own ``receive()`` of
uvicorn, Hypercorn and Granian only awaits plain futures. Task-per-request watchers cost tens of
microseconds per request and leave a cancelled task and a reference cycle behind each one; this
costs a coroutine step and a done-callback. A ``receive()`` we do not know (another middleware's
wrapper, which may use anyio and so needs ``current_task()``) is read in a real Task instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import anyio

from ._types import Message, Receive
from .compat.opentelemetry import unwrap_receive
from .compat.servers import drivable

BUFFER_LIMIT = 64 * 1024

_DISCONNECT = "http.disconnect"


class ReceivePump:
    __slots__ = (
        "_app_receive",
        "_buffer",
        "_buffered",
        "_closed",
        "_direct",
        "_disconnect",
        "_error",
        "_future",
        "_iter",
        "_observe",
        "_on_error",
        "_raw",
        "_reading",
        "_task",
        "_waiters",
    )

    def __init__(
        self,
        receive: Receive,
        observe: Callable[[Message], None],
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._app_receive = receive
        # Called from an ``except`` block when the read-ahead itself fails (never the server's
        # receive, whose errors go to the app); reading then falls back to the app's own calls.
        self._on_error = on_error or _no_error_hook
        self._raw = unwrap_receive(receive)
        self._direct = drivable(self._raw)
        self._observe = observe
        self._buffer: deque[Message] = deque()
        self._buffered = 0
        self._disconnect: Message | None = None
        self._error: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._iter: Any = None  # the pending read's iterator, when driven without a Task
        self._future: Any = None  # the future that read is parked on
        self._task: asyncio.Task[Message] | None = None
        self._reading = False  # the app itself is inside receive()
        self._closed = False

    @property
    def pending(self) -> bool:
        return self._iter is not None or self._task is not None

    # -- the read-ahead --------------------------------------------------------------------------

    def watch(self) -> None:
        """Read ahead until a read blocks; that blocked read is the disconnect watch."""
        while (
            not self._closed
            and self._iter is None
            and self._task is None
            and not self._reading
            and self._disconnect is None
            and self._error is None
            and self._buffered < BUFFER_LIMIT
        ):
            try:
                if self._direct:
                    message = self._advance(self._raw().__await__())
                else:
                    self._begin_task()
                    return
            except BaseException as exc:  # the server's receive() itself failed
                self._fail(exc)
                return
            if message is None:
                return
            self._accept(message)

    def _begin_task(self) -> None:
        task = asyncio.ensure_future(_read(self._raw))
        self._task = task
        task.add_done_callback(self._task_done)

    def _advance(self, it: Generator[Any, None, Message]) -> Message | None:
        try:
            yielded = next(it)
        except StopIteration as stop:
            message: Message = stop.value
            return message
        if getattr(yielded, "_asyncio_future_blocking", None):
            yielded._asyncio_future_blocking = False
            self._iter = it
            self._future = yielded
            yielded.add_done_callback(self._wake)
            return None
        if yielded is None:  # a bare yield: asyncio runs the coroutine again on the next turn
            self._iter = it
            self._future = None
            asyncio.get_running_loop().call_soon(self._wake, None)
            return None
        it.close()
        raise RuntimeError(f"receive() yielded {yielded!r}, not a future")

    def _wake(self, _future: Any) -> None:
        it = self._iter
        if self._closed or it is None:
            return
        self._iter = None
        self._future = None
        if self._step(it):
            self._resume()

    def _step(self, it: Any) -> bool:
        """Run the parked read on once; True when it gave a message (now accepted). False when
        it waits again or failed (the failure is handed on, as the server's receive raised)."""
        try:
            message = self._advance(it)
        except BaseException as exc:
            self._fail(exc)
            return False
        if message is None:
            return False
        self._accept(message)
        return True

    def _resume(self) -> None:
        """Read ahead again from inside the pump (a callback, or the app's receive()).

        A failure here is the read-ahead's own: it stops reading ahead (the app's next
        ``receive()`` reads from the server itself) and never loses the message in hand.
        """
        try:
            self.watch()
        except Exception:
            self._on_error()

    def _task_done(self, task: asyncio.Task[Message]) -> None:
        if task is not self._task:
            return
        self._task = None
        if task.cancelled():
            self._wake_waiters()
            return
        exc = task.exception()
        if exc is not None:
            self._fail(exc)
            return
        self._accept(task.result())
        self._resume()

    def _accept(self, message: Message) -> None:
        self._observe(message)
        if message.get("type") == _DISCONNECT:
            self._disconnect = message
        else:
            self._buffer.append(message)
            self._buffered += len(message.get("body") or b"")
        if self._waiters:
            self._wake_waiters()

    def _fail(self, exc: BaseException) -> None:
        # The app would have got this from its own receive(): hand it over at its next call.
        self._error = exc
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # -- the app's receive ---------------------------------------------------------------------

    async def receive(self) -> Message:
        while True:
            if self._buffer:
                message = self._buffer.popleft()
                self._buffered -= len(message.get("body") or b"")
                self._resume()  # resumes a read-ahead paused at the buffer limit
                return message
            if self._disconnect is not None:
                return dict(self._disconnect)
            if self._error is not None:
                exc, self._error = self._error, None
                raise exc
            if self._closed and self._task is not None and _only_if_ready():
                # After the response, a caller that wants only what is there at once (Starlette's
                # is_disconnected() reads in a cancelled scope) must not wait for the Task: it is
                # withdrawn and the app reads for itself, as it would without the read-ahead.
                self._cancel_task()
                continue
            if self.pending:  # a read-ahead in progress (after close() only a Task's) goes first
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                continue
            self._reading = True
            try:
                message = await self._app_receive()
            finally:
                self._reading = False
            self._observe(message)
            if message.get("type") == _DISCONNECT:
                self._disconnect = message
            else:
                self._resume()
            return message

    def close(self) -> None:
        """Stop reading ahead: the final response body was sent (or the app ended). Idempotent.

        Nothing already taken from the server is dropped: a read that has finished, even if its
        callback has not run yet (it finished in this same turn of the loop), is kept for the
        app's next ``receive()``. A driven read still waiting is withdrawn (its future cancelled,
        as a cancelled Task would, so a server that hands the message over in the future's result
        keeps it); a read in a Task is left to finish, since cancelling it could lose a message
        its receive() had already taken, and is cancelled only by ``end()``.
        """
        if self._closed:
            return
        self._closed = True
        if self._iter is not None:
            self._finish_driven()
        task = self._task
        if task is not None and task.done():
            self._task_done(task)
        self._wake_waiters()
        # observe is the request's bound method, and the request holds this pump: drop the
        # reference so the pair is freed by reference counting, not by a GC pass.
        self._observe = _ignore
        self._on_error = _no_error_hook

    def end(self) -> None:
        """The app returned: cancel a read still running in a Task (nobody will read it)."""
        self.close()
        self._cancel_task()

    def _cancel_task(self) -> None:
        task = self._task
        if task is None:
            return
        task.remove_done_callback(self._task_done)
        if task.done():  # finished in this turn: its message is kept, not thrown away
            self._task_done(task)
        else:
            self._task = None
            task.cancel()

    def _finish_driven(self) -> None:
        """At close: run the parked read on while it can make progress without waiting."""
        for _ in range(_FINISH_STEPS):
            it, future = self._iter, self._future
            if it is None:
                return
            if future is not None and not future.done():
                break
            # Done (its wake-up callback is still queued) or a bare yield: resume it now.
            if future is not None:
                with contextlib.suppress(Exception):
                    future.remove_done_callback(self._wake)
            self._iter = self._future = None
            if self._step(it) or self._iter is None:
                return  # a message, or a failure: nothing is parked any more
        it, future = self._iter, self._future
        self._iter = self._future = None
        if future is not None:
            with contextlib.suppress(Exception):
                future.remove_done_callback(self._wake)
            future.cancel()
        if it is not None:
            stop = getattr(it, "close", None) or getattr(it, "cancel", None)
            if stop is not None:
                stop()


# A read that keeps yielding without waiting (sleep(0) loops) is given this many steps at close.
_FINISH_STEPS = 8


def _only_if_ready() -> bool:
    """The caller runs in a cancelled anyio scope: it asks for a message only if one is ready."""
    try:
        return anyio.current_effective_deadline() == -math.inf
    except Exception:  # not inside anything anyio knows
        return False


def _ignore(message: Message) -> None:
    return None


def _no_error_hook() -> None:
    return None


async def _read(receive: Receive) -> Message:
    # receive() is called inside the task, so a task cancelled before it starts leaves no
    # never-awaited coroutine behind.
    return await receive()
