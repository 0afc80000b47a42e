"""Exceptions otel-disconnect raises into the app, only where an option asks for it."""


class ClientDisconnected(OSError):
    """Raised by ``send()`` after a detected disconnect when ``raise_on_send_after_disconnect``
    is on, as ASGI spec 2.4 asks of servers, whatever the server itself does."""
