"""Every shortcut otel-disconnect takes through another library's private internals, one module
per dependency, and nowhere else.

Each shortcut has a fallback through the library's public API, chosen once at import (or once
per object) when the private layout is not what the shortcut expects. ``tests/test_compat.py``
fails when a fallback is what runs on the supported versions, so an upgrade that disables a
fast path is caught in CI, not found in production as a slowdown; and it forces each fallback
and checks that it gives the same answers.

- ``opentelemetry``: the current span read from the contextvars runtime context; the ASGI
  instrumentation's receive wrapper recognised, so the read-ahead makes no "receive" spans; an
  SDK MeterProvider's metric readers (does it export anywhere?).
- ``prometheus``: a counter child's value incremented without ``Counter.inc``'s checks.
- ``sqlalchemy``: the pool entry's ``info`` behind a checked-out connection.
- ``servers``: the ASGI servers whose ``receive()`` only awaits plain futures, which the
  read-ahead can step by hand instead of running a task.
"""
