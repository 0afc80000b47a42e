"""Middleware options: keyword arguments, else ``OTEL_DISCONNECT_*`` variables, else defaults.

Validation happens here, at construction, so a bad option fails at start-up with a clear
``ValueError`` and never inside a request.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._types import Scope

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

CancelPolicy = bool | Callable[[Scope], bool]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_COUNT_TOKENS = ("auto", "off")


def _env(name: str) -> str | None:
    value = os.environ.get(f"OTEL_DISCONNECT_{name}")
    return None if value is None else value.strip()


def _env_bool(name: str) -> bool | None:
    raw = _env(name)
    if raw is None:
        return None
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"OTEL_DISCONNECT_{name}={raw!r}: expected true or false")


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
    ) -> Config:
        """Merge arguments with the environment; an argument always wins."""
        cancel: CancelPolicy = (
            cancel_on_disconnect
            if cancel_on_disconnect is not None
            else bool(_env_bool("CANCEL_ON_DISCONNECT"))
        )
        if not (isinstance(cancel, bool) or callable(cancel)):
            raise ValueError(
                f"cancel_on_disconnect must be a bool or a callable(scope) -> bool, got {cancel!r}"
            )
        raise_on_send = (
            raise_on_send_after_disconnect
            if raise_on_send_after_disconnect is not None
            else bool(_env_bool("RAISE_ON_SEND_AFTER_DISCONNECT"))
        )
        tokens = count_tokens if count_tokens is not None else (_env("COUNT_TOKENS") or "auto")
        if tokens not in _COUNT_TOKENS:
            raise ValueError(f"count_tokens must be one of {_COUNT_TOKENS}, got {tokens!r}")
        if retry_window_s is None:
            raw = _env("RETRY_WINDOW_S")
            try:
                retry_window_s = float(raw) if raw else 30.0
            except ValueError:
                raise ValueError(
                    f"OTEL_DISCONNECT_RETRY_WINDOW_S={raw!r}: expected seconds"
                ) from None
        if not retry_window_s >= 0:
            raise ValueError(f"retry_window_s must be >= 0, got {retry_window_s!r}")
        if excluded_urls is None:
            excluded_urls = _env("EXCLUDED_URLS")
        return cls(
            cancel_on_disconnect=cancel,
            raise_on_send_after_disconnect=raise_on_send,
            excluded_urls=_compile_excluded(excluded_urls),
            count_tokens=tokens,
            retry_window_s=float(retry_window_s),
            retry_identity=_identity_hook(
                retry_identity if retry_identity is not None else _env("RETRY_IDENTITY")
            ),
            redis_url=_redis_url(redis_url),
            fleet=_fleet(fleet),
            registry=registry,
            tracer_provider=tracer_provider,
        )

    def wants_cancel(self, scope: Scope) -> bool:
        policy = self.cancel_on_disconnect
        return policy(scope) if callable(policy) else policy


def _compile_excluded(value: str | Iterable[str] | None) -> re.Pattern[str] | None:
    """Comma-separated regular expressions searched in the path, like OTEL_PYTHON_EXCLUDED_URLS."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    patterns = [p.strip() for p in parts if p.strip()]
    if not patterns:
        return None
    try:
        return re.compile("|".join(f"(?:{p})" for p in patterns))
    except re.error as exc:
        raise ValueError(f"excluded_urls: invalid regular expression: {exc}") from None


def _identity_hook(
    value: Callable[[Scope], str | bytes | None] | str | None,
) -> Callable[[Scope], str | bytes | None] | None:
    """``retry_identity``: a callable(scope), or ``"module:attribute"`` naming one."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        module, _, attr = value.partition(":")
        try:
            found: Any = importlib.import_module(module.strip())
            for part in attr.strip().split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(
                f"retry_identity={value!r}: expected 'module:function' ({exc})"
            ) from None
        value = found
    if not callable(value):
        raise ValueError(
            f"retry_identity must be a callable(scope) -> str | bytes | None, got {value!r}"
        )
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
        raise TypeError(f"unknown otel-disconnect option(s): {', '.join(unknown)}")
    return Config.from_options(**kwargs)
