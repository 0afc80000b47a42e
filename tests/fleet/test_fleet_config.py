"""``redis_url`` and ``fleet`` are checked at start-up, naming the option or the variable."""

from __future__ import annotations

import pytest

from otel_disconnect.config import Config


@pytest.mark.parametrize("url", ["http://redis:6379", "redis:6379", "redis://"])
def test_bad_redis_url_names_the_option(url: str) -> None:
    with pytest.raises(ValueError, match="redis_url"):
        Config.from_options(redis_url=url)


def test_bad_redis_url_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_DISCONNECT_REDIS_URL", "tcp://nowhere")
    with pytest.raises(ValueError, match="OTEL_DISCONNECT_REDIS_URL"):
        Config.from_options()


def test_valid_urls_and_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Config.from_options(redis_url="unix:///run/redis.sock").redis_url
    assert Config.from_options(redis_url="valkey://h:6379/0").redis_url == "redis://h:6379/0"
    assert Config.from_options().fleet == "default"
    monkeypatch.setenv("OTEL_DISCONNECT_FLEET", "bad name!")
    with pytest.raises(ValueError, match="OTEL_DISCONNECT_FLEET"):
        Config.from_options()


def test_middlewares_of_one_process_share_one_channel() -> None:
    """instrument_app's option check, several apps, a rebuilt stack: one reader, one writer and
    one value of the channel gauge per fleet and registry, each middleware's tracker fed."""
    from prometheus_client import CollectorRegistry

    from otel_disconnect import DisconnectMiddleware
    from otel_disconnect.fleet import events

    async def app(scope: object, receive: object, send: object) -> None:
        pass

    url = "redis://127.0.0.1:1/0"  # never connected: nothing is started here
    registry = CollectorRegistry()
    a = DisconnectMiddleware(app, redis_url=url, registry=registry)
    b = DisconnectMiddleware(app, redis_url=url, registry=registry)
    other = DisconnectMiddleware(app, redis_url=url, registry=CollectorRegistry())
    assert a.fleet.channel is b.fleet.channel
    assert other.fleet.channel is not a.fleet.channel
    a.fleet.channel.on_event(events.Event("r", "default", "elsewhere", 0.0, fp=b"\x07" * 8))
    assert b"\x07" * 8 in a.retries.entries and b"\x07" * 8 in b.retries.entries
    assert b"\x07" * 8 not in other.retries.entries
