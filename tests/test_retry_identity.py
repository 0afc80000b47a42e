"""Which client a retry fingerprint names: Idempotency-Key, then the app's identity, then the
address; and the ``retry_identity`` option's validation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from otel_disconnect import DisconnectMiddleware
from otel_disconnect.retry import BodyDigest, client_identity, fingerprint

Message = dict[str, Any]


def _scope(
    client: str, headers: list[tuple[bytes, bytes]] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat",
        "headers": list(headers or ()),
        "client": (client, 5000),
        **extra,
    }


def _body(data: bytes) -> BodyDigest:
    digest = BodyDigest()
    digest.update(data)
    return digest


def test_key_then_identity_then_address() -> None:
    same = _body(b"prompt")
    # Two users behind one proxy address, same body: told apart by the app's identity.
    alice = _scope("10.0.0.1", state={"otel_disconnect_client": "alice"})
    bob = _scope("10.0.0.1", state={"otel_disconnect_client": "bob"})
    assert fingerprint(alice, "/v1/chat", same, client_identity(alice, None)) != fingerprint(
        bob, "/v1/chat", same, client_identity(bob, None)
    )
    # The same user from two addresses (a mobile client changing networks): the same.
    alice2 = _scope("10.0.0.9", state={"otel_disconnect_client": "alice"})
    assert fingerprint(alice, "/v1/chat", same, client_identity(alice, None)) == fingerprint(
        alice2, "/v1/chat", same, client_identity(alice2, None)
    )
    # The hook wins over request.state; bytes and other values are accepted.
    assert client_identity(alice, lambda scope: b"tenant-1") == b"tenant-1"
    assert client_identity(alice, lambda scope: 42) == b"42"
    assert client_identity(_scope("10.0.0.1"), lambda scope: None) is None
    # An Idempotency-Key wins over everything, body included.
    k1 = _scope("10.0.0.1", [(b"idempotency-key", b"k")], state={"otel_disconnect_client": "a"})
    k2 = _scope("10.0.0.2", [(b"Idempotency-Key", b"k")], state={"otel_disconnect_client": "b"})
    assert fingerprint(k1, "/v1/chat", same, b"a") == fingerprint(k2, "/v1/chat", _body(b"x"), b"b")
    # No identity: the address.
    assert fingerprint(_scope("10.0.0.1"), "/v1/chat", same) != fingerprint(
        _scope("10.0.0.2"), "/v1/chat", same
    )


def who(scope: dict[str, Any]) -> str | None:
    user = scope.get("user")
    return None if user is None else str(user)


def test_retry_identity_option_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    mw = DisconnectMiddleware(app, retry_identity=who, registry=CollectorRegistry())
    assert mw.config.retry_identity is who
    monkeypatch.setenv("OTEL_DISCONNECT_RETRY_IDENTITY", f"{__name__}:who")
    assert DisconnectMiddleware(app, registry=CollectorRegistry()).config.retry_identity is who
    for bad in (f"{__name__}:nowhere", "no_such_module_here:who", f"{__name__}"):
        monkeypatch.setenv("OTEL_DISCONNECT_RETRY_IDENTITY", bad)
        with pytest.raises(ValueError, match=r"^OTEL_DISCONNECT_RETRY_IDENTITY="):
            DisconnectMiddleware(app, registry=CollectorRegistry())
    monkeypatch.delenv("OTEL_DISCONNECT_RETRY_IDENTITY")
    with pytest.raises(ValueError, match=r"^retry_identity=3: expected a callable"):
        DisconnectMiddleware(app, retry_identity=3, registry=CollectorRegistry())  # type: ignore[arg-type]


def _run(mw: DisconnectMiddleware, scope: dict[str, Any], leave: bool) -> None:
    """One request through the middleware: the client either hangs up mid-work or waits."""

    async def main() -> None:
        messages: asyncio.Queue[Message] = asyncio.Queue()
        messages.put_nowait({"type": "http.request", "body": b"prompt", "more_body": False})

        async def receive() -> Message:
            return await messages.get()

        async def send(message: Message) -> None:
            return None

        if leave:
            messages.put_nowait({"type": "http.disconnect"})
        await mw(scope, receive, send)

    asyncio.run(main())


def test_a_failing_hook_falls_back_to_the_address() -> None:
    registry = CollectorRegistry()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await asyncio.sleep(0.01)  # the read-ahead sees the disconnect meanwhile
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    def broken(scope: Any) -> str:
        raise RuntimeError("auth service down")

    mw = DisconnectMiddleware(app, retry_identity=broken, registry=registry)
    _run(mw, _scope("10.0.0.1"), leave=True)
    _run(mw, _scope("10.0.0.1"), leave=False)  # the same address and body, after: a retry
    _run(mw, _scope("10.0.0.2"), leave=False)  # another address: not
    assert (
        registry.get_sample_value(
            "otel_disconnect_retries_after_disconnect_total", {"route": "unmatched"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "otel_disconnect_internal_errors_total", {"where": "retry_identity"}
        )
        >= 1
    )
