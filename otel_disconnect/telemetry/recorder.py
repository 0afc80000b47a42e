"""Turns a RequestState into span attributes and metric updates, at three moments.

- start: the request is in flight;
- disconnect: the client left prematurely (span event, client wait);
- end: the app task ended (counters, histograms, span attributes unless already written).

The in-flight gauges are not moved here: the middleware moves them itself, in the one
``finally`` that ends every request, so no error in recording can leave them wrong.

Integrations (tokens, database) keep per-request objects in ``state.extras``; each may implement
``on_disconnect(state)``, ``span_attributes(state) -> dict`` and ``record_end(state, metrics,
route)``, and the recorder calls them at the same moments.
"""

from __future__ import annotations

import time
from typing import Any

from ..routes import route_template
from ..state import RequestState
from . import spans
from .metrics import Metrics


class Recorder:
    __slots__ = ("metrics",)

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def disconnect(self, state: RequestState) -> None:
        m = self.metrics
        route = state.route = route_template(state.scope)
        offset = state.offset_s or 0.0
        m.client_wait.labels(route).observe(offset)
        spans.add_event(
            state.span,
            spans.EVENT_CLIENT_DISCONNECT,
            {spans.PHASE: state.phase, spans.DETECTED_BY: state.detected_by or ""},
            int((state.disconnected_at or time.time()) * 1e9),
        )
        if state.extras:
            for extra in list(state.extras.values()):
                extra.on_disconnect(state)

    def write_span(self, state: RequestState, work_end_perf: float) -> None:
        """Write the request-level attributes once, before the server span ends."""
        if state.span_written:
            return
        state.span_written = True
        if not spans.recording(state.span):
            return
        attrs: dict[str, Any] = {}
        if state.detected_perf is not None:
            detected = state.detected_perf or work_end_perf
            attrs.update(
                {
                    spans.DETECTED: True,
                    spans.PHASE: state.phase,
                    spans.DETECTED_BY: state.detected_by or "",
                    spans.OFFSET_S: state.offset_s or 0.0,
                    spans.OUTCOME: state.outcome or "",
                    spans.WORK_AFTER_S: max(0.0, work_end_perf - detected),
                    spans.SENDS_DROPPED: state.sends_dropped,
                    spans.BYTES_DROPPED: state.bytes_dropped,
                }
            )
            if state.protected_section is not None:
                attrs[spans.PROTECTED_SECTION] = state.protected_section
        if state.stream_end is not None:
            attrs[spans.STREAM_END] = state.stream_end
        if state.extras:
            for extra in list(state.extras.values()):
                attrs.update(extra.span_attributes(state))
        spans.set_attributes(state.span, attrs)

    def end(self, state: RequestState) -> None:
        """The app task ended: counters and histograms, and the span if it is still open."""
        now = time.perf_counter()
        m = self.metrics
        route = state.route = route_template(state.scope)
        m.count_request(route, state.method)
        if state.detected_perf is not None:
            outcome = state.outcome or "completed"
            m.client_disconnects.labels(route, state.method, state.phase, outcome).inc()
            m.work_after_disconnect.labels(route, outcome).observe(
                max(0.0, now - (state.detected_perf or now))
            )
            if state.sends_dropped:
                m.sends_after_disconnect.labels(route).inc(state.sends_dropped)
            if state.bytes_dropped:
                m.bytes_after_disconnect.labels(route).inc(state.bytes_dropped)
        if state.detected_perf is not None or state.extras:
            self.write_span(state, now)
        if state.extras:
            for extra in list(state.extras.values()):
                extra.record_end(state, m, route)
