"""otel-disconnect: make HTTP client disconnects visible and safe in ASGI services.

The public API (the README's "Three ways to instrument" and "In the handler"). Everything
else is internal and may change.
"""

from .cancel import guard_stream, protect
from .context import client_state, current
from .db.engine import instrument_engine
from .db.pg_activity import PgActivityCollector
from .errors import ClientDisconnected
from .exposition import metrics_app
from .instrumentor import DisconnectInstrumentor, instrument_app
from .llm import record_tokens
from .middleware import DisconnectMiddleware
from .state import RequestView
from .version import __version__

__all__ = [
    "ClientDisconnected",
    "DisconnectInstrumentor",
    "DisconnectMiddleware",
    "PgActivityCollector",
    "RequestView",
    "__version__",
    "client_state",
    "current",
    "guard_stream",
    "instrument_app",
    "instrument_engine",
    "metrics_app",
    "protect",
    "record_tokens",
]
