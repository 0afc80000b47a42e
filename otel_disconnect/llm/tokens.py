"""``record_tokens()``: count output tokens for the current request."""

from __future__ import annotations

from ..context import current_state
from ..failsafe import internal_error
from .account import EXPLICIT, Segment, account_for


def record_tokens(n: int = 1, *, model: str | None = None) -> None:
    """Count ``n`` generated output tokens for the current request; a no-op outside a request.

    Call it as tokens are produced (once per token, or per chunk with its size): the time of the
    call decides whether they count as after the client disconnected. A task started inside the
    request keeps counting against it after the request ended; those tokens reach the metrics
    only. Explicit counts take precedence over the automatic sources (httpx upstream streams,
    the app's own OpenAI-compatible response), so nothing is counted twice.
    """
    state = current_state()
    if state is None or n < 0:
        return
    try:
        account = account_for(state)
        if model:
            account.set_model(model, explicit=True)
        tally = account.tally(EXPLICIT)
        if not tally.open:
            tally.add_segment(Segment(state.start_perf), state.detected_perf)
        account.counted(state, tally.open[0], int(n), delivered=False)
    except Exception:
        internal_error("record_tokens", metrics=state.metrics)
