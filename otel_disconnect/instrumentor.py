"""``instrument_app()`` and ``DisconnectInstrumentor`` (the ``opentelemetry-instrument`` entry point).

The order that matters: the OpenTelemetry server middleware outermost (it owns the server span),
then DisconnectMiddleware (so it sees the server's own ``receive``), then the app's middleware.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from typing import Any

from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from ._types import ASGIApp
from .exposition import metrics_app
from .middleware import DisconnectMiddleware
from .package import _instruments

logger = logging.getLogger("otel_disconnect")

_MARK = "_otel_disconnect_instrumented"


def _is_otel_middleware(cls: Any) -> bool:
    return getattr(cls, "__name__", "") == "OpenTelemetryMiddleware" and (
        getattr(cls, "__module__", "") or ""
    ).startswith("opentelemetry.instrumentation")


def _insert_middleware(app: Any, options: dict[str, Any]) -> None:
    """Put DisconnectMiddleware just inside any OpenTelemetry middleware in ``user_middleware``."""
    from starlette.middleware import Middleware

    stack = app.user_middleware
    if any(m.cls is DisconnectMiddleware for m in stack):
        return
    index = 0
    for i, entry in enumerate(stack):
        if _is_otel_middleware(entry.cls):
            index = i + 1
    stack.insert(index, Middleware(DisconnectMiddleware, **options))


def _has_server_span_middleware(app: Any) -> bool:
    if getattr(app, "_is_instrumented_by_opentelemetry", False):
        return True
    return any(_is_otel_middleware(m.cls) for m in getattr(app, "user_middleware", ()))


def _add_otel_middleware(app: Any, tracer_provider: Any) -> None:
    """The server span: the FastAPI instrumentation when installed, else the plain ASGI one."""
    try:
        import fastapi

        if isinstance(app, fastapi.FastAPI):
            from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

            FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)
            return
    except ImportError:
        pass
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.middleware import Middleware

    # Outermost, so its span covers everything the app's middleware does.
    app.user_middleware.insert(
        0, Middleware(OpenTelemetryMiddleware, tracer_provider=tracer_provider)
    )


def instrument_app(
    app: ASGIApp,
    *,
    engines: Iterable[Any] = (),
    metrics_path: str | None = "/metrics",
    **options: Any,
) -> ASGIApp:
    """Instrument a Starlette or FastAPI app in place (or wrap a plain ASGI app) and return it.

    Adds the OpenTelemetry server instrumentation when it is absent, DisconnectMiddleware inside
    it, a Prometheus route at ``metrics_path`` (None for none), and instruments ``engines``.
    Calling it twice changes nothing.
    """
    engines = list(engines)
    if engines:
        from .db.engine import instrument_engine

        for engine in engines:
            instrument_engine(engine, registry=options.get("registry"))
    if getattr(app, _MARK, False):
        return app
    if metrics_path:
        excluded = options.get("excluded_urls")
        extra = f"^{metrics_path}$"
        if excluded is None:
            options["excluded_urls"] = [extra]
        elif isinstance(excluded, str):
            options["excluded_urls"] = [*excluded.split(","), extra]
        else:
            options["excluded_urls"] = [*excluded, extra]
    DisconnectMiddleware(_noop_app, **options)  # validates options now, not at first request
    if not hasattr(app, "user_middleware"):
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        wrapped: ASGIApp = DisconnectMiddleware(app, **options)
        if not _is_otel_middleware(type(app)):
            wrapped = OpenTelemetryMiddleware(wrapped, tracer_provider=options.get("tracer_provider"))
        return wrapped
    if getattr(app, "middleware_stack", None) is not None:
        raise RuntimeError(
            "instrument_app() must be called before the app serves its first request "
            "(Starlette cannot add middleware after start-up)"
        )
    if not _has_server_span_middleware(app):
        _add_otel_middleware(app, options.get("tracer_provider"))
    _insert_middleware(app, options)
    if metrics_path:
        from starlette.routing import Route

        app.router.routes.insert(  # type: ignore[attr-defined]
            0, Route(metrics_path, metrics_app(options.get("registry")), methods=["GET"])
        )
    setattr(app, _MARK, True)
    return app


async def _noop_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
    return None


class DisconnectInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments every Starlette/FastAPI app built after ``instrument()`` is called.

    ``opentelemetry-instrument`` calls it through the ``opentelemetry_instrumentor`` entry point.
    The app gets its middleware when Starlette builds its middleware stack (on the first request),
    by which time every instrumentor has run and we can see whether a server span middleware is
    already there.
    """

    _original_build: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        from starlette.applications import Starlette

        if DisconnectInstrumentor._original_build is not None:
            return
        options = {
            k: v
            for k, v in kwargs.items()
            if k in ("registry", "tracer_provider", "cancel_on_disconnect",
                     "raise_on_send_after_disconnect", "excluded_urls", "count_tokens",
                     "retry_window_s")
        }
        DisconnectMiddleware(_noop_app, **options)  # fail at start-up on a bad option
        original = Starlette.build_middleware_stack
        DisconnectInstrumentor._original_build = original

        def build_middleware_stack(self: Any) -> Any:
            try:
                if not getattr(self, _MARK, False):
                    if not _has_server_span_middleware(self):
                        _add_otel_middleware_raw(self, options.get("tracer_provider"))
                    _insert_middleware(self, options)
                    setattr(self, _MARK, True)
            except Exception:
                logger.exception("otel-disconnect could not instrument %r; serving it unchanged", self)
            return original(self)

        Starlette.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
        try:
            from .db import auto

            auto.install(options.get("registry"))  # SQLAlchemy engines created from now on
        except ImportError:
            pass  # SQLAlchemy is optional

    def _uninstrument(self, **kwargs: Any) -> None:
        from starlette.applications import Starlette

        original = DisconnectInstrumentor._original_build
        if original is not None:
            Starlette.build_middleware_stack = original  # type: ignore[method-assign]
            DisconnectInstrumentor._original_build = None
        try:
            from .db import auto

            auto.uninstall()
        except ImportError:
            pass


def _add_otel_middleware_raw(app: Any, tracer_provider: Any) -> None:
    """At build time the FastAPI instrumentor can no longer wrap: add the ASGI middleware."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.middleware import Middleware

    app.user_middleware.insert(
        0, Middleware(OpenTelemetryMiddleware, tracer_provider=tracer_provider)
    )
