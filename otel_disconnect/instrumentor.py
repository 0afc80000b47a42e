"""``instrument_app()`` and ``DisconnectInstrumentor`` (the opentelemetry-instrument entry point).

The order that matters: the OpenTelemetry server middleware outermost (it owns the server span),
then DisconnectMiddleware (so it sees the server's own ``receive``), then the app's middleware.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Collection, Iterable
from typing import Any, ClassVar

from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from ._types import ASGIApp
from .compat.opentelemetry import is_otel_middleware
from .config import OPTION_NAMES, metrics_path_from_env, metrics_path_option
from .exposition import metrics_app
from .failsafe import internal_error
from .middleware import DisconnectMiddleware
from .package import _instruments

logger = logging.getLogger("otel_disconnect")

_MARK = "_otel_disconnect_instrumented"


def _insert_middleware(app: Any, options: dict[str, Any]) -> None:
    """Put DisconnectMiddleware just inside any OpenTelemetry middleware in ``user_middleware``."""
    from starlette.middleware import Middleware

    stack = app.user_middleware
    if any(m.cls is DisconnectMiddleware for m in stack):
        return
    index = 0
    for i, entry in enumerate(stack):
        if is_otel_middleware(entry.cls):
            index = i + 1
    stack.insert(index, Middleware(DisconnectMiddleware, **options))  # type: ignore[arg-type]


def _has_server_span_middleware(app: Any) -> bool:
    if getattr(app, "_is_instrumented_by_opentelemetry", False):
        return True
    return any(is_otel_middleware(m.cls) for m in getattr(app, "user_middleware", ()))


def _tracing_works(tracer_provider: Any, registry: Any) -> bool:
    """Whether the tracer provider (or the global one) hands out a tracer without raising.

    Start-up never fails because of telemetry: with a provider that raises, the app is served
    without the server span (and so without span attributes), counted and logged once.
    """
    try:
        from opentelemetry import trace

        trace.get_tracer("otel_disconnect", tracer_provider=tracer_provider)
        return True
    except Exception:
        internal_error("tracer_provider", registry)
        return False


def _add_otel_middleware(app: Any, tracer_provider: Any, meter_provider: Any = None) -> None:
    """The server span: the FastAPI instrumentation when installed, else the plain ASGI one."""
    try:
        import fastapi

        if isinstance(app, fastapi.FastAPI):
            from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

            FastAPIInstrumentor.instrument_app(
                app, tracer_provider=tracer_provider, meter_provider=meter_provider
            )
            return
    except ImportError:
        pass
    _add_asgi_middleware(app, tracer_provider, meter_provider)


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
    metrics_path = metrics_path_option(metrics_path)
    options = _exclude_metrics_path(options, metrics_path)
    DisconnectMiddleware(_noop_app, **options)  # validates options now, not at first request
    engines = list(engines)
    if engines:
        from .db.engine import instrument_engine

        for engine in engines:
            instrument_engine(engine, registry=options.get("registry"))
    if getattr(app, _MARK, False):
        return app
    tracer_provider = options.get("tracer_provider")
    if not hasattr(app, "user_middleware"):
        wrapped: ASGIApp = DisconnectMiddleware(app, **options)
        if not is_otel_middleware(type(app)) and _tracing_works(
            tracer_provider, options.get("registry")
        ):
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

            try:
                wrapped = OpenTelemetryMiddleware(
                    wrapped,
                    tracer_provider=tracer_provider,
                    meter_provider=options.get("meter_provider"),
                )
            except Exception:
                internal_error("tracer_provider", options.get("registry"))
        return wrapped
    if getattr(app, "middleware_stack", None) is not None:
        raise RuntimeError(
            "instrument_app() must be called before the app serves its first request "
            "(Starlette cannot add middleware after start-up)"
        )
    if not _has_server_span_middleware(app) and _tracing_works(
        tracer_provider, options.get("registry")
    ):
        try:
            _add_otel_middleware(app, tracer_provider, options.get("meter_provider"))
        except Exception:
            internal_error("tracer_provider", options.get("registry"))
    _instrument_starlette(app, options, metrics_path)
    return app


def _instrument_starlette(app: Any, options: dict[str, Any], metrics_path: str | None) -> None:
    _insert_middleware(app, options)
    if metrics_path and not any(
        getattr(route, "path", None) == metrics_path for route in app.router.routes
    ):
        from starlette.routing import Route

        app.router.routes.insert(
            0, Route(metrics_path, metrics_app(options.get("registry")), methods=["GET"])
        )
    setattr(app, _MARK, True)


def _exclude_metrics_path(options: dict[str, Any], metrics_path: str | None) -> dict[str, Any]:
    """Prometheus scrapes are not requests worth counting: leave the metrics route out."""
    if not metrics_path:
        return options
    extra = f"^{re.escape(metrics_path)}$"
    excluded = options.get("excluded_urls")
    if excluded is None:
        excluded = os.environ.get("OTEL_DISCONNECT_EXCLUDED_URLS")
    if excluded is None:
        patterns = [extra]
    elif isinstance(excluded, str):
        patterns = [*excluded.split(","), extra]
    else:
        patterns = [*excluded, extra]
    return {**options, "excluded_urls": patterns}


async def _noop_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
    return None


class DisconnectInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments every Starlette/FastAPI app built after ``instrument()`` is called.

    ``opentelemetry-instrument`` calls it through the ``opentelemetry_instrumentor`` entry point.
    The app gets its middleware when it builds its middleware stack (on the first request), by
    which time every instrumentor has run and we can see whether a server span middleware is
    already there. FastAPI has its own ``build_middleware_stack``, so each class that defines one
    is patched.
    """

    _originals: ClassVar[dict[Any, Any]] = {}

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        if DisconnectInstrumentor._originals:
            return
        # OTEL_DISCONNECT_METRICS_PATH="" serves no metrics route; an app's own route wins.
        metrics_path = metrics_path_from_env()
        options = _exclude_metrics_path(
            {k: v for k, v in kwargs.items() if k in OPTION_NAMES}, metrics_path
        )
        DisconnectMiddleware(_noop_app, **options)  # fail at start-up on a bad option
        for cls in _app_classes():
            original = cls.__dict__["build_middleware_stack"]
            DisconnectInstrumentor._originals[cls] = original
            cls.build_middleware_stack = _patched_build(original, options, metrics_path)
        try:
            from .db import auto

            auto.install(options.get("registry"))  # SQLAlchemy engines created from now on
        except ImportError:
            pass  # SQLAlchemy is optional

    def _uninstrument(self, **kwargs: Any) -> None:
        for cls, original in DisconnectInstrumentor._originals.items():
            cls.build_middleware_stack = original
        DisconnectInstrumentor._originals.clear()
        try:
            from .db import auto

            auto.uninstall()
        except ImportError:
            pass


def _app_classes() -> list[Any]:
    """Every class defining ``build_middleware_stack`` up from FastAPI and Starlette (the FastAPI
    instrumentor may already have replaced ``fastapi.FastAPI`` with a subclass)."""
    from starlette.applications import Starlette

    roots: list[type] = [Starlette]
    try:
        import fastapi

        roots.insert(0, fastapi.FastAPI)
    except ImportError:
        pass
    found: list[Any] = []
    for root in roots:
        for cls in root.__mro__:
            if "build_middleware_stack" in cls.__dict__ and cls not in found:
                found.append(cls)
    return found


def _patched_build(original: Any, options: dict[str, Any], metrics_path: str | None) -> Any:
    @functools.wraps(original)
    def build_middleware_stack(self: Any) -> Any:
        try:
            if not getattr(self, _MARK, False):
                tracer_provider = options.get("tracer_provider")
                if not _has_server_span_middleware(self) and _tracing_works(
                    tracer_provider, options.get("registry")
                ):
                    _add_asgi_middleware(self, tracer_provider, options.get("meter_provider"))
                _instrument_starlette(self, options, metrics_path)
        except Exception:
            logger.exception("otel-disconnect could not instrument %r; serving it as is", self)
        return original(self)

    return build_middleware_stack


def _add_asgi_middleware(app: Any, tracer_provider: Any, meter_provider: Any = None) -> None:
    """The plain ASGI server-span middleware, outermost among the app's middleware (also used at
    build time, when the FastAPI instrumentor can no longer wrap the app)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.middleware import Middleware

    app.user_middleware.insert(
        0,
        Middleware(
            OpenTelemetryMiddleware, tracer_provider=tracer_provider, meter_provider=meter_provider
        ),
    )
