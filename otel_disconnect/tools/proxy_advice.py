"""Which reverse proxy answered, and which of its settings to look at when a hang-up is lost.

What the advice says is what the tests measured through the real nginx, HAProxy and Caddy (the
README's proxy table). A proxy is recognised by the ``Server`` or ``Via`` header of its
responses: nginx and Caddy put their name there; HAProxy adds nothing, so it is named among the
possibilities when no proxy is recognised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ASGI_SERVERS = ("uvicorn", "hypercorn", "granian", "daphne")

ADVICE: dict[str, dict[str, str]] = {
    "nginx": {
        "before_response": "nginx: proxy_ignore_client_abort on keeps the upstream request "
        "running after the client left; set it off (the default)",
        "streaming": "nginx: a hang-up mid-stream reaches the app at its next write; if it does "
        "not, check proxy_ignore_client_abort and that proxy_buffering off is set for streams",
        "request_body": "nginx: with proxy_request_buffering off an abandoned upload reaches the "
        "app as a disconnect; check proxy_ignore_client_abort",
    },
    "caddy": {
        "before_response": "Caddy: flush_interval -1 makes reverse_proxy ignore a client that "
        "left until it next writes to it; remove it (Caddy flushes text/event-stream at once "
        "anyway)",
        "streaming": "Caddy: a hang-up mid-stream reaches the app at its next write; check for "
        "a buffering handler (request_buffers/response_buffers) in front of reverse_proxy",
        "request_body": "Caddy: check request_buffers on reverse_proxy (it reads the body first)",
    },
    "haproxy": {
        "before_response": "HAProxy: it takes the client's close for a half-close and waits for "
        "the server's response; the app hears of it at its first response bytes. "
        "option abortonclose passes it on for a request whose body came after its head (most "
        "clients' POSTs), not for one that arrived in one read: set it, send headers early or "
        "bound the work",
        "streaming": "HAProxy: a hang-up mid-stream reaches the app at its next write",
        "request_body": "HAProxy: check option http-buffer-request (it waits for the whole body)",
    },
}

NOT_FORWARDED = {
    "nginx": "nginx reads the whole request body before it connects upstream "
    "(proxy_request_buffering on): an abandoned upload never reaches the app, nothing to detect",
}


def identify(headers: Iterable[Mapping[str, str]]) -> str | None:
    """``nginx``, ``caddy``, ``haproxy`` from Server/Via headers (names lower-case), or None."""
    for response in headers:
        for name in ("via", "server"):
            value = response.get(name, "").lower()
            for proxy in ("nginx", "caddy", "haproxy"):
                if proxy in value:
                    return proxy
    return None


def advice(proxy: str | None, kinds: Iterable[str]) -> list[str]:
    """What to look at for the kinds of disconnect that went undetected."""
    lines = []
    for kind in kinds:
        proxies = [proxy] if proxy in ADVICE else list(ADVICE)
        for name in proxies:
            if kind in ADVICE[name]:
                lines.append(f"{kind}: {ADVICE[name][kind]}")
    return lines
