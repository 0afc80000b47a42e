"""The outcome of a request whose client left early: did the app's work run to its end for nobody?

One rule, decided in :func:`decide` (the middleware asks it when the app sends its final body
after the disconnect, and when the app task ends):

- ``error``: the app raised something other than a "client went away" exception.
- ``cancelled``: the work stopped. Any one of these says so:

  1. the app ended without sending its final body (``CancelledError``, Starlette's
     ``ClientDisconnect``, an ``OSError`` from ``send``, or the framework cut its stream short);
  2. its final answer is a placeholder: status 499 (client closed request), or not one body byte
     after the disconnect where the response could carry one (vLLM's ``with_cancellation``
     answers an empty ``Response()`` once it cancelled the handler; a stream whose framework
     only sends the closing empty chunk);
  3. something inside the request saw the work stop early: the vLLM engine aborted the request,
     an upstream LLM stream was closed before its end, or the app itself read
     ``current().disconnected`` as true before it started its response (it checked and
     stopped; an app that only awaits ``wait_disconnected()``, say to log, is not taken to
     have stopped);
  4. the final body went out while the request's own work was still running (an integration's
     ``Extension.work_running``: a vLLM engine request neither finished nor aborted yet). The
     answer cannot be the work's result: vLLM 0.13's ``with_cancellation`` returns ``None``,
     which FastAPI sends as ``null``, before the cancelled handler has aborted the engine.

- ``completed``: none of that: the app sent a real final answer after the client had left
  (a body with content, or a 204/205/304 or a HEAD response, which carry none by definition).

Responses are never changed: the rule only reads what the app sent.
"""

from __future__ import annotations

from .state import RequestState

COMPLETED = "completed"
CANCELLED = "cancelled"
ERROR = "error"

# What _failure_kind in the middleware reports for the app task's end.
FAILURE_CANCELLED = "cancelled"
FAILURE_DISCONNECT = "disconnect_error"

CLIENT_CLOSED_REQUEST = 499  # nginx's "client closed request", used by LiteLLM
_NO_BODY_STATUS = frozenset((204, 205, 304))


def decide(state: RequestState, failure: str | None, final_sent: bool) -> str:
    """The outcome of a disconnected request (see the module docstring for the rule).

    ``failure``: None when the app task returned (or has not ended yet, at the final send),
    ``cancelled``, ``disconnect_error`` or ``error``. ``final_sent``: the app sent its final body.
    """
    if failure is not None:
        return CANCELLED if failure in (FAILURE_CANCELLED, FAILURE_DISCONNECT) else ERROR
    if not final_sent:
        return CANCELLED  # the framework cut the stream short and returned
    status = state.status
    if status == CLIENT_CLOSED_REQUEST:
        return CANCELLED
    if state.work_stopped is not None:
        return CANCELLED
    extras = state.extras
    if extras and any(extra.work_running(state) for extra in extras.values()):
        return CANCELLED  # answered while its work still ran: a placeholder
    if not state.bytes_dropped and not _bodiless(state, status):
        return CANCELLED  # an empty placeholder, or only the closing chunk of a running stream
    return COMPLETED


def _bodiless(state: RequestState, status: int | None) -> bool:
    """A response that carries no body by definition: emptiness is its whole answer."""
    return state.method == "HEAD" or status in _NO_BODY_STATUS
