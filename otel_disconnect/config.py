"""Middleware options: keyword arguments, else ``OTEL_DISCONNECT_*`` variables, else defaults.

Validation happens here, at construction, so a bad option fails at start-up with a
``ValueError`` that names the option (or the variable it came from), the value and what is
allowed, and never inside a request.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from ._types import Scope

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

CancelPolicy = bool | Callable[[Scope], bool]

ENV_PREFIX = "OTEL_DISCONNECT_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_COUNT_TOKENS = ("auto", "off")
# Which metrics sink (telemetry.sinks); "auto": OpenTelemetry when a MeterProvider exports
# somewhere and no registry was passed, else prometheus-client.
_METRICS = ("auto", "prometheus", "opentelemetry", "both")
# A retry later than a day is not a retry of the request that was cut off.
MAX_RETRY_WINDOW_S = 86_400.0


def _env(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name)
    return None if value is None else value.strip()


def _where(option: str, from_env: bool) -> str:
    """How an error message names the option: the variable when the value came from there."""
    return ENV_PREFIX + option.upper() if from_env else option


def _env_bool(option: str) -> bool | None:
    raw = _env(option.upper())
    if raw is None:
        return None
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(
        f"{_where(option, True)}={raw!r}: expected one of true, false, 1, 0, yes, no, on, off"
    )


def _bool_option(option: str, value: bool | None) -> bool:
    if value is None:
        return bool(_env_bool(option))
    if not isinstance(value, bool):
        raise ValueError(f"{option}={value!r}: expected True or False")
    return value


def _retry_window(value: float | None) -> float:
    option = "retry_window_s"
    from_env = value is None
    if value is None:
        raw = _env(option.upper())
        if not raw:
            return 30.0
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(
                f"{_where(option, True)}={raw!r}: expected a number of seconds"
            ) from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{option}={value!r}: expected a number of seconds")
    if not (math.isfinite(value) and 0 <= value <= MAX_RETRY_WINDOW_S):
        raise ValueError(
            f"{_where(option, from_env)}={value!r}: expected seconds between 0 (off) and "
            f"{MAX_RETRY_WINDOW_S:g}"
        )
    return float(value)


@dataclass(frozen=True)
class Config:
    cancel_on_disconnect: CancelPolicy = False
    raise_on_send_after_disconnect: bool = False
    excluded_urls: re.Pattern[str] | None = None
    count_tokens: str = "auto"
    retry_window_s: float = 30.0
    retry_identity: Callable[[Scope], str | bytes | None] | None = None
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    fleet: str = "default"
    registry: CollectorRegistry | None = None
    tracer_provider: TracerProvider | None = field(default=None, repr=False)
    metrics: str = "auto"
    meter_provider: MeterProvider | None = field(default=None, repr=False)

    @classmethod
    def from_options(
        cls,
        *,
        cancel_on_disconnect: CancelPolicy | None = None,
        raise_on_send_after_disconnect: bool | None = None,
        excluded_urls: str | Iterable[str] | None = None,
        count_tokens: str | None = None,
        retry_window_s: float | None = None,
        retry_identity: Callable[[Scope], str | bytes | None] | str | None = None,
        redis_url: str | None = None,
        fleet: str | None = None,
        registry: CollectorRegistry | None = None,
        tracer_provider: TracerProvider | None = None,
        metrics: str | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> Config:
        """Merge arguments with the environment; an argument always wins."""
        if cancel_on_disconnect is None:
            cancel: CancelPolicy = bool(_env_bool("cancel_on_disconnect"))
        elif isinstance(cancel_on_disconnect, bool) or callable(cancel_on_disconnect):
            cancel = cancel_on_disconnect
        else:
            raise ValueError(
                f"cancel_on_disconnect={cancel_on_disconnect!r}: expected True, False or a "
                "callable(scope) -> bool"
            )
        raise_on_send = _bool_option(
            "raise_on_send_after_disconnect", raise_on_send_after_disconnect
        )
        tokens_from_env = count_tokens is None
        tokens = count_tokens if count_tokens is not None else (_env("COUNT_TOKENS") or "auto")
        if tokens not in _COUNT_TOKENS:
            raise ValueError(
                f"{_where('count_tokens', tokens_from_env)}={tokens!r}: expected one of "
                + ", ".join(_COUNT_TOKENS)
            )
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise ValueError(
                f"registry={registry!r}: expected a prometheus_client CollectorRegistry or None"
            )
        get_tracer = getattr(tracer_provider, "get_tracer", None)
        if tracer_provider is not None and not callable(get_tracer):
            raise ValueError(
                f"tracer_provider={tracer_provider!r}: expected an OpenTelemetry TracerProvider"
            )
        sink = metrics_option(metrics)
        if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
            raise ValueError(
                f"meter_provider={meter_provider!r}: expected an OpenTelemetry MeterProvider"
            )
        excluded_from_env = excluded_urls is None
        if excluded_urls is None:
            excluded_urls = _env("EXCLUDED_URLS")
        return cls(
            cancel_on_disconnect=cancel,
            raise_on_send_after_disconnect=raise_on_send,
            excluded_urls=_compile_excluded(excluded_urls, excluded_from_env),
            count_tokens=tokens,
            retry_window_s=_retry_window(retry_window_s),
            retry_identity=_identity_hook(
                retry_identity if retry_identity is not None else _env("RETRY_IDENTITY"),
                from_env=retry_identity is None,
            ),
            redis_url=_redis_url(redis_url),
            fleet=_fleet(fleet),
            registry=registry,
            tracer_provider=tracer_provider,
            metrics=sink,
            meter_provider=meter_provider,
        )

    def wants_cancel(self, scope: Scope) -> bool:
        policy = self.cancel_on_disconnect
        return policy(scope) if callable(policy) else policy


def metrics_option(metrics: str | None) -> str:
    """``metrics=`` (None: ``OTEL_DISCONNECT_METRICS``, else ``auto``), validated; the middleware
    and ``PgActivityCollector`` read it the same way."""
    sink = metrics if metrics is not None else (_env("METRICS") or "auto")
    if sink not in _METRICS:
        raise ValueError(
            f"{_where('metrics', metrics is None)}={sink!r}: expected one of " + ", ".join(_METRICS)
        )
    return sink


def _compile_excluded(
    value: str | Iterable[str] | None, from_env: bool = False
) -> re.Pattern[str] | None:
    """Comma-separated regular expressions searched in the path, like OTEL_PYTHON_EXCLUDED_URLS."""
    if value is None:
        return None
    where = _where("excluded_urls", from_env)
    if isinstance(value, str):
        parts = value.split(",")
    else:
        try:
            parts = list(value)
        except TypeError:
            raise ValueError(
                f"{where}={value!r}: expected comma-separated regular expressions or a list of them"
            ) from None
    if not all(isinstance(p, str) for p in parts):
        raise ValueError(f"{where}={value!r}: expected regular expressions as strings")
    patterns = [p.strip() for p in parts if p.strip()]
    if not patterns:
        return None
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"{where}: {pattern!r} is not a valid regular expression ({exc})"
            ) from None
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def metrics_path_option(value: str | None, from_env: bool = False) -> str | None:
    """A metrics route path: None or "" for no route, else an absolute path such as /metrics."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.startswith("/") or any(c.isspace() for c in value):
        raise ValueError(
            f"{_where('metrics_path', from_env)}={value!r}: expected a path starting with '/' "
            "(such as /metrics), or empty for no metrics route"
        )
    return value


def metrics_path_from_env(default: str = "/metrics") -> str | None:
    """``OTEL_DISCONNECT_METRICS_PATH``, validated; unset means ``default``."""
    raw = _env("METRICS_PATH")
    if raw is None:
        return default
    return metrics_path_option(raw, from_env=True)


def _identity_hook(
    value: Callable[[Scope], str | bytes | None] | str | None, from_env: bool = False
) -> Callable[[Scope], str | bytes | None] | None:
    """``retry_identity``: a callable(scope), or ``"module:attribute"`` naming one."""
    where = _where("retry_identity", from_env)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        module, _, attr = value.partition(":")
        try:
            found: Any = importlib.import_module(module.strip())
            for part in attr.strip().split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"{where}={value!r}: expected 'module:function' ({exc})") from None
        value = found
    if not callable(value):
        raise ValueError(f"{where}={value!r}: expected a callable(scope) -> str | bytes | None")
    return value


_REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")
_FLEET = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _redis_url(value: str | None) -> str | None:
    """``redis_url`` / ``OTEL_DISCONNECT_REDIS_URL``: the fleet channel (checked, not connected)."""
    name = "redis_url"
    if value is None:
        value, name = _env("REDIS_URL"), "OTEL_DISCONNECT_REDIS_URL"
    if not value:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a URL string, got {value!r}")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in _REDIS_SCHEMES or not rest:
        raise ValueError(
            f"{name}: expected redis://host:port/db, rediss://... or unix:///path, got a value "
            f"with scheme {scheme!r}"
        )
    if scheme.lower().startswith("valkey"):  # Valkey speaks the same protocol
        value = "redis" + value[len("valkey") :]
    try:
        import redis.asyncio
    except ImportError:
        raise ValueError(
            f"{name} is set but redis-py is missing: pip install 'otel-disconnect[redis]'"
        ) from None
    try:
        redis.asyncio.ConnectionPool.from_url(value)  # parses only; no connection is made
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}: {exc}") from None
    return value


def _fleet(value: str | None) -> str:
    name = "fleet"
    if value is None:
        value, name = _env("FLEET"), "OTEL_DISCONNECT_FLEET"
    if value is None or value == "":
        return "default"
    if not isinstance(value, str) or not _FLEET.fullmatch(value):
        raise ValueError(f"{name}: 1 to 64 letters, digits, '.', '_' or '-', got {value!r}")
    return value


def options_from(kwargs: dict[str, Any]) -> Config:
    """Build a Config from ``**options``, naming any unknown option."""
    known = set(Config.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"unknown otel-disconnect option(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return Config.from_options(**kwargs)


OPTION_NAMES = frozenset(Config.__dataclass_fields__)
