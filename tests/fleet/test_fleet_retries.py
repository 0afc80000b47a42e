"""A disconnect heard from the fleet, placed on this process's clock: a retry that began just
before the event's disconnect time (the other process saw it late) is still a retry; the
disconnected request itself, or an earlier attempt still running, never is."""

from __future__ import annotations

import time

from otel_disconnect.fleet import events
from otel_disconnect.fleet.process import REMOTE_GRACE_S, FleetRetries
from otel_disconnect.retry import RetryTracker

FP = b"\x05" * 8


def heard(tracker: RetryTracker, disconnected: float, started: float | None) -> None:
    retries = FleetRetries("redis://127.0.0.1:1/0", "default", tracker, None)
    retries.on_event(
        events.parse(events.retry("default", "elsewhere", FP, disconnected, 30.0, started=started))
    )


def perf(wall: float) -> float:
    return wall + time.perf_counter() - time.time()


def test_a_retry_that_began_just_before_the_disconnect_was_seen_is_a_retry() -> None:
    tracker = RetryTracker(30.0)
    now = time.time()
    heard(tracker, disconnected=now, started=now - 5)
    assert tracker.is_retry(FP, perf(now - REMOTE_GRACE_S / 2))
    assert not tracker.is_retry(FP, perf(now - REMOTE_GRACE_S * 2))


def test_the_disconnected_request_and_earlier_attempts_are_never_retries_of_it() -> None:
    tracker = RetryTracker(30.0)
    now = time.time()
    # The disconnected attempt began 0.1 s before its disconnect: an earlier attempt that began
    # 0.05 s before that one is inside the grace, but began first.
    heard(tracker, disconnected=now, started=now - 0.1)
    assert not tracker.is_retry(FP, perf(now - 0.15))
    # Its own start, as this process would see it: wall-clock and perf_counter conversions are
    # made at different instants here and in the channel, so allow them a millisecond.
    assert not tracker.is_retry(FP, perf(now - 0.1) - 0.001)
    assert tracker.is_retry(FP, perf(now - 0.05))


def test_an_event_without_a_start_keeps_the_grace() -> None:
    tracker = RetryTracker(30.0)
    now = time.time()
    heard(tracker, disconnected=now, started=None)
    assert tracker.is_retry(FP, perf(now - REMOTE_GRACE_S / 2))
