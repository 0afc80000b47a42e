"""Exceptions otel-disconnect raises into the app (only where an option asks for it), and which
of the app's exceptions mean the client went away."""


class ClientDisconnected(OSError):
    """Raised by ``send()`` after a detected disconnect when ``raise_on_send_after_disconnect``
    is on, as ASGI spec 2.4 asks of servers, whatever the server itself does."""


def is_disconnect_error(exc: BaseException) -> bool:
    """A framework's or server's "the client went away" exception: Starlette raises
    ``ClientDisconnect`` from ``request.stream()``, and ASGI 2.4 servers (or
    ``raise_on_send_after_disconnect``) raise ``OSError`` from ``send()``. Starlette's is known
    by name: importing Starlette here would load it for every app."""
    return isinstance(exc, OSError) or type(exc).__name__ == "ClientDisconnect"
