"""Shortcuts through prometheus-client internals."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def _value_inc(child: Any) -> Callable[[float], None] | None:
    """The ``inc`` of a metric child's private ``_value`` (a ``MutexValue``, or a ``MmapedValue``
    in multiprocess mode), or None when the child has no such thing."""
    value = getattr(child, "_value", None)
    inc = getattr(value, "inc", None)
    return inc if callable(inc) else None


def fast_inc(child: Any) -> Callable[[], None]:
    """A call that adds 1 to ``child``: ``child._value.inc(1)``, skipping ``Counter.inc``'s
    argument check and exemplar handling (half its cost per request); ``child.inc`` when the
    private value is not there."""
    inc = _value_inc(child)
    return functools.partial(inc, 1) if inc is not None else child.inc


def fast_dec(child: Any) -> Callable[[], None]:
    """``fast_inc``'s counterpart for a gauge child; ``child.dec`` as the fallback."""
    inc = _value_inc(child)
    return functools.partial(inc, -1) if inc is not None else child.dec


def is_fast(call: Callable[[], None]) -> bool:
    """True when ``call`` came from the shortcut, not the fallback (for the compat tests)."""
    return isinstance(call, functools.partial)
