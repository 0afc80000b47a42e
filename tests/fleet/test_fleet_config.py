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
