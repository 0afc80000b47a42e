"""Shortcuts through opentelemetry-api and opentelemetry-instrumentation-asgi internals."""

from __future__ import annotations

from collections.abc import Callable
from types import FunctionType
from typing import Any

from opentelemetry import trace


def _span_reader() -> tuple[Callable[[], Any], bool]:
    """How to read the current span once per request, and whether that is the fast path.

    ``trace.get_current_span()`` is four Python calls and an ABC ``isinstance``; with the default
    contextvars runtime context the span is one ``ContextVar.get()`` and a dict lookup away
    (``_RUNTIME_CONTEXT._current_context`` and ``_SPAN_KEY`` are private). Any other runtime
    context (``OTEL_PYTHON_CONTEXT``), or another layout of these names, gets the public
    function.
    """
    try:
        from opentelemetry import context as otel_context
        from opentelemetry.trace.propagation import _SPAN_KEY

        runtime = otel_context._RUNTIME_CONTEXT
        var = runtime._current_context  # type: ignore[attr-defined]
        if type(runtime).__name__ != "ContextVarsRuntimeContext" or not hasattr(var, "get"):
            return trace.get_current_span, False
    except Exception:
        return trace.get_current_span, False
    get = var.get

    def current_span() -> Any:
        # None (no span) is what spans.recording() treats as "nothing to write on".
        return get().get(_SPAN_KEY)

    return current_span, True


current_span, CURRENT_SPAN_FAST = _span_reader()


def is_asgi_receive_wrapper(receive: Any) -> bool:
    """True for the receive wrapper ``OpenTelemetryMiddleware`` hands the app.

    It is a closure named ``otel_receive`` in opentelemetry-instrumentation-asgi with the
    server's receive as ``__wrapped__`` (``functools.wraps`` copied the wrapped function's name
    and module onto it, so it is recognised by its code object). The fallback, when a release
    renames it, is to keep the wrapper: the read-ahead then makes "receive" spans, nothing worse.
    """
    # Only plain functions are looked at: a server's receive is a bound method, on which a
    # missing attribute costs a raised and caught AttributeError (about a microsecond).
    if type(receive) is not FunctionType:
        return False
    code = receive.__code__
    return (
        code.co_name == "otel_receive"
        and "opentelemetry" in code.co_filename
        and getattr(receive, "__wrapped__", None) is not None
    )


def unwrap_receive(receive: Any) -> Any:
    """The receive under any OpenTelemetry ASGI receive wrappers (only those: any other
    middleware's receive may change the messages and is kept)."""
    while is_asgi_receive_wrapper(receive):
        receive = receive.__wrapped__
    return receive


def is_otel_middleware(cls: Any) -> bool:
    """``OpenTelemetryMiddleware`` of opentelemetry-instrumentation-asgi, by its public name
    (imported lazily by users; importing it here would load the instrumentation for everyone)."""
    return getattr(cls, "__name__", "") == "OpenTelemetryMiddleware" and (
        getattr(cls, "__module__", "") or ""
    ).startswith("opentelemetry.instrumentation")


def sdk_metric_readers(provider: Any) -> list[Any] | None:
    """The SDK MeterProvider's metric readers, or None when they cannot be read.

    The SDK has no public accessor: ``_metric_readers`` (SDK 1.28 and later) or
    ``_sdk_config.metric_readers`` (before). Without them every SDK provider counts as exporting
    (``metrics="auto"`` then picks OpenTelemetry for an SDK provider that has no reader);
    tests/test_compat.py fails when neither is there.
    """
    readers = getattr(provider, "_metric_readers", None)
    if readers is None:
        readers = getattr(getattr(provider, "_sdk_config", None), "metric_readers", None)
    if readers is None:
        return None
    try:
        return list(readers)
    except TypeError:
        return None
