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


def options_from(kwargs: dict[str, Any]) -> Config:
    """Build a Config from ``**options``, naming any unknown option."""
    known = set(Config.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown otel-disconnect option(s): {', '.join(unknown)}")
    return Config.from_options(**kwargs)
