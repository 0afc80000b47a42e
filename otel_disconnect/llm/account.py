"""The per-request token account: what each source counted, and what goes to the span and metrics.

One account per request, in ``state.extras``, created by the first token a source sees. Sources
never double count: the span and the metrics report one source, the first that counted anything
in this order (documented in the README):

0. ``engine``: vLLM's or SGLang's engine, inside its server (``llm.vllm_engine``,
   ``llm.sglang_engine``): exact;
1. ``explicit``: ``record_tokens()``;
2. ``upstream``: OpenAI-compatible responses read with httpx inside the request;
3. ``response``: the OpenAI-compatible body the app itself sends.

A token is *after disconnect* when counted after detection. *Undelivered*: for the app's own
body, tokens in chunks not passed to the server's ``send()`` before detection; for the other
sources, the tokens the response body delivered before detection are subtracted when the body
could be counted, else nothing counts as delivered when no response had started at detection,
else every token counted before detection is taken as delivered.

Where only a total is known (``usage`` without per-chunk counts) the split is estimated pro rata
by time over the generation window (request or upstream call start → usage seen), and the span
says ``disconnect.tokens_estimated = true``; where chunk counts and ``usage`` disagree the usage
total wins and the chunk split is scaled to it (also estimated). A count of SSE chunks with no
usage figure to confirm it is itself a guess (a chunk may carry several tokens: vLLM under
speculative decoding or when it merges deltas), so it is estimated too, also without a
disconnect; a usage figure equal to the chunk count confirms it.

Tokens counted after the request ended (a producer task, an upstream stream still open) reach
the metrics directly, never the ended span.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

from ..routes import route_template
from ..state import Extension, RequestState
from ..telemetry import spans
from ..telemetry.metrics import Metrics, metrics_for

ENGINE = "engine"
EXPLICIT = "explicit"
UPSTREAM = "upstream"
RESPONSE = "response"
PRECEDENCE = (ENGINE, EXPLICIT, UPSTREAM, RESPONSE)
KEY = "otel_disconnect.llm.tokens"
# Set in state.extras as soon as an engine source sees the request: the response and upstream
# observers then skip parsing (the engine's count is exact).
ENGINE_KEY = "otel_disconnect.llm.engine"

# Upstream streams still open when the request ended (not a span attribute; a gateway's leak).
UPSTREAM_OPEN_AT_END = "disconnect.llm.upstream_streams_open"

# After the request ended, generation counts as finished once no token came for this long; then
# the generation-after-disconnect histogram is observed.
IDLE_S = 0.5
# A stream left open this long with no token no longer delays the histogram.
STALLED_S = 60.0
# Closed upstream calls are folded into sums; at most this many are kept open per request.
MAX_OPEN_SEGMENTS = 64


def _fraction_after(start: float, end: float, detected: float) -> float:
    if end <= start:
        return 1.0 if detected <= start else 0.0
    return min(1.0, max(0.0, (end - max(detected, start)) / (end - start)))


class Segment:
    """One counted stream of tokens: a response body, one upstream call, or record_tokens()."""

    __slots__ = (
        "after",
        "by_chunks",
        "counted",
        "delivered",
        "usage_total",
        "window_end",
        "window_start",
    )

    def __init__(self, window_start: float) -> None:
        self.by_chunks = False  # counted one token per SSE chunk output (a guess without usage)
        self.counted = 0
        self.after = 0
        self.delivered = 0
        self.usage_total: int | None = None
        self.window_start = window_start
        self.window_end: float | None = None

    def split(self, detected: float | None) -> tuple[int, int, int, bool]:
        """(total, after, delivered, estimated) of this segment."""
        total, after, delivered = self.counted, self.after, self.delivered
        usage = self.usage_total
        if usage is None:
            return total, after, delivered, self.by_chunks
        if usage == total:
            return total, after, delivered, False
        if total:
            after = round(after * usage / total)
            delivered = min(usage - after, round(delivered * usage / total))
        elif detected is not None:
            end = self.window_end if self.window_end is not None else time.perf_counter()
            after = round(usage * _fraction_after(self.window_start, end, detected))
            delivered = 0
        else:
            after = delivered = 0
        return usage, after, delivered, True


class Tally:
    """A source's segments: closed ones folded into sums, open ones computed live."""

    __slots__ = ("folded", "open")

    def __init__(self) -> None:
        self.folded = [0, 0, 0, False, False]  # total, after, delivered, estimated, guessed
        self.open: list[Segment] = []

    def guessed(self) -> bool:
        """Whether the total rests on chunk counts that no usage figure confirmed."""
        if self.folded[4]:
            return True
        return any(s.by_chunks and s.usage_total is None for s in self.open)

    def has_tokens(self) -> bool:
        if self.folded[0]:
            return True
        return any(s.counted or s.usage_total is not None for s in self.open)

    def close(self, segment: Segment, detected: float | None) -> None:
        if segment in self.open:
            self.open.remove(segment)
            self._fold(segment, detected)

    def _fold(self, segment: Segment, detected: float | None) -> None:
        total, after, delivered, estimated = segment.split(detected)
        folded = self.folded
        folded[0] += total
        folded[1] += after
        folded[2] += delivered
        folded[3] = bool(folded[3]) or estimated
        folded[4] = bool(folded[4]) or (segment.by_chunks and segment.usage_total is None)

    def add_segment(self, segment: Segment, detected: float | None) -> None:
        if len(self.open) >= MAX_OPEN_SEGMENTS:
            self._fold(self.open.pop(0), detected)
        self.open.append(segment)

    def split(self, detected: float | None) -> tuple[int, int, int, bool]:
        total, after, delivered, estimated, _ = self.folded
        for segment in self.open:
            t, a, d, e = segment.split(detected)
            total += t
            after += a
            delivered += d
            estimated = estimated or e
        return int(total), int(after), int(delivered), bool(estimated)


class TokenAccount(Extension):
    """The recorder's integration object for tokens: ``span_attributes`` and ``record_end``."""

    __slots__ = (
        "_exemplar_context",
        "_lock",
        "_observed",
        "_timer",
        "ended",
        "last_token_perf",
        "metrics",
        "model",
        "model_label",
        "open_streams",
        "reported",
        "reported_source",
        "route",
        "tallies",
    )

    def __init__(self) -> None:
        self.tallies: dict[str, Tally] = {}
        self.model: str | None = None
        self.model_label: str | None = None
        self.open_streams = 0
        self.last_token_perf: float | None = None
        self.ended = False
        self.metrics: Metrics | None = None
        self.route: str | None = None
        self.reported = (0, 0, 0)
        self.reported_source: str | None = None
        self._observed = False
        self._timer: Any = None
        self._exemplar_context: Any = None
        self._lock = threading.Lock()  # record_tokens() may run in worker threads

    # -- written by the sources ----------------------------------------------------------------

    def tally(self, source: str) -> Tally:
        found = self.tallies.get(source)
        if found is None:
            found = self.tallies[source] = Tally()
        return found

    def set_model(self, model: str | None, *, explicit: bool = False) -> None:
        if model and (self.model is None or explicit):
            self.model = model

    def counted(self, state: RequestState, segment: Segment, n: int, delivered: bool) -> None:
        """``n`` tokens of ``segment`` were produced now."""
        if n <= 0:
            return
        detected = state.detected_perf
        with self._lock:
            segment.counted += n
            if detected is not None:
                segment.after += n
                self.last_token_perf = time.perf_counter()
            elif delivered:
                segment.delivered += n
        if state.ended:
            self.late(state)

    def usage(self, state: RequestState, segment: Segment, total: int) -> None:
        """An authoritative total for ``segment`` (a ``usage`` object)."""
        segment.usage_total = total
        segment.window_end = time.perf_counter()
        if state.detected_perf is not None and total > segment.counted:
            self.last_token_perf = segment.window_end
        if state.ended:
            self.late(state)

    # -- the recorder's hooks ------------------------------------------------------------------

    def summary(self, state: RequestState) -> tuple[str, int, int, int, bool] | None:
        """(source, total, after, undelivered, estimated) of the source that wins, or None."""
        source = self.reported_source
        if source is None:
            tallies = self.tallies
            source = next((s for s in PRECEDENCE if s in tallies and tallies[s].has_tokens()), None)
        if source is None:
            return None
        detected = state.detected_perf
        total, after, delivered, estimated = self.tallies[source].split(detected)
        after = min(after, total)
        if detected is None:
            # Nothing was split; a usage total is exact, a chunk count a guess.
            return source, total, 0, 0, self.tallies[source].guessed()
        if source != RESPONSE:
            delivered = self._delivered_elsewhere(state, total - after)
        undelivered = min(total, max(after, total - delivered))
        return source, total, after, undelivered, estimated

    def _delivered_elsewhere(self, state: RequestState, before: int) -> int:
        """Tokens of another source that reached the client before detection."""
        if state.phase != "streaming":
            return 0  # no response had started: nothing was delivered
        response = self.tallies.get(RESPONSE)
        if response is not None and response.has_tokens():
            _, _, delivered, _ = response.split(state.detected_perf)
            return min(before, delivered)
        return before

    def span_attributes(self, state: RequestState) -> dict[str, Any]:
        found = self.summary(state)
        attrs: dict[str, Any] = {}
        if found is not None:
            _, total, after, undelivered, estimated = found
            attrs[spans.OUTPUT_TOKENS] = total
            if state.detected_perf is not None:
                attrs[spans.TOKENS_AFTER] = after
                attrs[spans.TOKENS_UNDELIVERED] = undelivered
            if estimated:
                attrs[spans.TOKENS_ESTIMATED] = True
        if state.ended and self.open_streams > 0:
            attrs[UPSTREAM_OPEN_AT_END] = self.open_streams
        return attrs

    def record_end(self, state: RequestState, metrics: Metrics, route: str) -> None:
        with self._lock:
            self.ended = True
            self.metrics = metrics
            self.route = route
            self._report(state)
            detected = state.detected_perf
            if detected is None or self.reported[0] == 0:
                return
            if self.open_streams == 0 and self.reported_source == RESPONSE:
                self._observe(detected)  # the app's own body cannot grow after the app ended
            else:
                self._finish_when_idle(state)  # a producer or an upstream may still be going

    # -- after the request ended ---------------------------------------------------------------

    def late(self, state: RequestState) -> None:
        """Tokens counted after the request ended go straight to the metrics."""
        with self._lock:
            if not self.ended:
                # Created after the request ended: the recorder never saw this account.
                self.ended = True
                self.metrics = getattr(state, "metrics", None) or metrics_for(None)
                self.route = state.route or route_template(state.scope)
            self._report(state)
            if state.detected_perf is not None:
                self._finish_when_idle(state)

    def upstream_closed(self, state: RequestState) -> None:
        if self.ended and self.open_streams == 0 and self._timer is None:
            self.late(state)

    def _report(self, state: RequestState) -> None:
        """Add to the counters what the winning source counted since the last report."""
        metrics = self.metrics
        found = self.summary(state)
        if metrics is None or found is None:
            return
        source, total, after, undelivered, _ = found
        if self.reported_source is None:
            self.reported_source = source
        if self.model_label is None:
            self.model_label = metrics.model_label(self.model)
        route, model = self.route or "unmatched", self.model_label
        old_total, old_after, old_undelivered = self.reported
        if total > old_total:
            metrics.llm_tokens.labels(route, model).inc(total - old_total)
        if after > old_after:
            metrics.llm_tokens_after_disconnect.labels(route, model).inc(after - old_after)
        if undelivered > old_undelivered:
            metrics.llm_tokens_undelivered.labels(route, model).inc(undelivered - old_undelivered)
        self.reported = (
            max(total, old_total),
            max(after, old_after),
            max(undelivered, old_undelivered),
        )

    def _finish_when_idle(self, state: RequestState) -> None:
        """Observe generation-after-disconnect once tokens stopped coming (at most once)."""
        if self._observed or self._timer is not None:
            return
        detected = state.detected_perf
        if detected is None:
            return
        self._exemplar_context = spans.exemplar_context(state.span)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._observe(detected)  # a worker thread: no timer, observe what we know now
            return
        self._timer = _later(loop, IDLE_S, self._idle_check, detected)

    def _idle_check(self, loop: asyncio.AbstractEventLoop, detected: float) -> None:
        last = self.last_token_perf
        quiet = time.perf_counter() - (last if last is not None else detected)
        if quiet < IDLE_S or (self.open_streams > 0 and quiet < STALLED_S):
            delay = IDLE_S - quiet if quiet < IDLE_S else IDLE_S
            self._timer = _later(loop, delay, self._idle_check, detected)
            return
        self._timer = None
        self._observe(detected)

    def _observe(self, detected: float) -> None:
        if self._observed or self.metrics is None:
            return
        self._observed = True
        last = self.last_token_perf
        seconds = max(0.0, last - detected) if last is not None else 0.0
        child = self.metrics.llm_generation_after_disconnect.labels(
            self.route or "unmatched", self.model_label or "unknown"
        )
        # Observed from a timer with an empty context: the request's span context is put back
        # for the observation, so the OpenTelemetry sink's exemplar carries its trace id.
        spans.in_context(self._exemplar_context, child.observe, seconds)


def _later(loop: asyncio.AbstractEventLoop, delay: float, callback: Any, detected: float) -> Any:
    # An empty context: the timer must not keep the request's context (and its state) alive.
    return loop.call_later(delay, callback, loop, detected, context=contextvars.Context())


def account_for(state: RequestState) -> TokenAccount:
    account: TokenAccount = state.extra(KEY, TokenAccount)
    return account
