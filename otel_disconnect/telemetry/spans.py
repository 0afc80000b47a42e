"""Span attribute and event names (docs/reference.md), and writing them onto the server span."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace

from ..compat import opentelemetry as _otel_compat

DETECTED = "disconnect.detected"
PHASE = "disconnect.phase"
DETECTED_BY = "disconnect.detected_by"
OFFSET_S = "disconnect.offset_s"
OUTCOME = "disconnect.outcome"
WORK_AFTER_S = "disconnect.work_after_s"
SENDS_DROPPED = "disconnect.sends_dropped"
BYTES_DROPPED = "disconnect.bytes_dropped"
PROTECTED_SECTION = "disconnect.protected_section"
STREAM_END = "disconnect.stream_end"
RETRY_OF_DISCONNECTED = "disconnect.retry_of_disconnected"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TOKENS_AFTER = "disconnect.tokens_after"
TOKENS_UNDELIVERED = "disconnect.tokens_undelivered"
TOKENS_ESTIMATED = "disconnect.tokens_estimated"
DB_TRANSACTION_STATE = "disconnect.db.transaction_state"
DB_TRANSACTION_AGE_S = "disconnect.db.transaction_age_s"
DB_LEFT_OPEN = "disconnect.db.left_open"
DB_BACKEND_PIDS = "disconnect.db.backend_pids"
# Attributes of the db.transaction.* events (one connection each).
DB_BACKEND_PID = "disconnect.db.backend_pid"
DB_STATEMENT_RUNNING = "disconnect.db.statement_running"
DB_ORPHAN_OWNER = "disconnect.db.orphan_owner"
DB_IDLE_IN_TRANSACTION_S = "disconnect.db.idle_in_transaction_s"
DB_SYSTEM_NAME = "db.system.name"

EVENT_CLIENT_DISCONNECT = "client.disconnect"
EVENT_DB_TRANSACTION_INTERRUPTED = "db.transaction.interrupted"
EVENT_DB_TRANSACTION_ORPHANED = "db.transaction.orphaned"

# Read once per request by the middleware (a module attribute, so a test can replace it).
current_span: Callable[[], Any] = _otel_compat.current_span


def recording(span: Any) -> bool:
    """True for a span that still takes attributes (not ended, not a no-op span)."""
    try:
        return span is not None and bool(span.is_recording())
    except Exception:
        return False


def set_attributes(span: Any, attributes: Mapping[str, Any]) -> None:
    if attributes and recording(span):
        span.set_attributes(dict(attributes))


def add_event(span: Any, name: str, attributes: Mapping[str, Any], timestamp_ns: int) -> None:
    if recording(span):
        span.add_event(name, dict(attributes), timestamp=timestamp_ns)




def trace_id_hex(span: Any) -> str:
    """The span's trace id as 32 hex digits (how logs and the fleet's events name a request),
    or "" for no span."""
    try:
        context = span.get_span_context()
        return format(context.trace_id, "032x") if context.trace_id else ""
    except Exception:
        return ""


def exemplar_context(span: Any) -> Any:
    """A context holding only ``span``'s identity (no attributes, nothing of the request), for
    an observation made later from outside the request; None when there is no sampled span."""
    try:
        span_context = span.get_span_context()
        if not span_context.is_valid:
            return None
        return trace.set_span_in_context(trace.NonRecordingSpan(span_context))
    except Exception:
        return None


def in_context(context: Any, call: Callable[[float], Any], value: float) -> None:
    """``call(value)`` with ``context`` current (as is, when None)."""
    if context is None:
        call(value)
        return
    from opentelemetry import context as otel_context

    token = otel_context.attach(context)
    try:
        call(value)
    finally:
        otel_context.detach(token)
