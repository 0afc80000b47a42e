"""The retry storm across processes: ``uvicorn --workers 4`` behind one port, clients that hang
up while the server works on their request and retry twice. Each worker's log line says which
worker served which attempt. Without Redis a retry is flagged only when an earlier attempt of the
same client happened to land on the same worker; with the fleet channel every retry is flagged;
and distinct requests that come after the disconnects are never flagged.

Deterministic by construction, not by timing: a client hangs up once its attempt's handler runs
(the worker logged it), and the next round of attempts starts only once every disconnect of the
round was detected and, on Redis, heard by every other worker. (Without those waits a retry can
start before its disconnect is known anywhere: that race is what ``REMOTE_GRACE_S`` covers in
production, and not what this test is about.)"""

from __future__ import annotations

import collections
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from otel_disconnect.fleet import events
from otel_disconnect.fleet.channel import stream_key

from ..multiproc_server import scrape, value
from ..servers import RawClient, wait_for
from .redis_server import RedisServer
from .workers import fleet_app

WORKERS = 4
CLIENTS = 8
ATTEMPTS = 3
SERVER_WORK_S = 0.9
ROUTE = 'method="POST",route="/generate"'


def _hang_up_once_served(port: int, client: int, attempt: int, log: Path) -> None:
    """One attempt: sent, and abandoned once a worker's handler has started on it."""
    body = f'{{"prompt": "client {client}"}}'.encode()
    tag = f"{client}:{attempt}"
    with RawClient(port) as conn:
        conn.request(
            "POST", f"/generate?seconds={SERVER_WORK_S}", body=body,
            headers={"X-Attempt": tag},
        )
        wait_for(lambda: log.exists() and f" {tag}\n" in log.read_text(), 30, interval=0.01)


def _round_known(port: int, redis: RedisServer | None, rounds: int) -> None:
    """Every disconnect so far detected by its worker and, on Redis, heard by the others."""
    # Any worker answers the scrape with the sum over all of them.
    disconnects = CLIENTS * rounds
    wait_for(lambda: value(scrape(port), "otel_disconnect_client_wait_seconds_count",
                           'route="/generate"') == disconnects, 30)
    if redis is not None:
        wait_for(lambda: value(scrape(port), "otel_disconnect_fleet_events_received_total",
                               'kind="retry"') == disconnects * (WORKERS - 1), 30)


def _storm_rounds(port: int, log: Path, redis: RedisServer | None) -> None:
    # One connection at a time: a burst of connections to idle workers is accepted by whichever
    # wakes first, all of them (seen: every attempt on one worker); one at a time, each is a
    # race of its own among the workers. The order changes from round to round.
    order = random.Random(15)
    for attempt in range(ATTEMPTS):
        for client in order.sample(range(CLIENTS), CLIENTS):
            _hang_up_once_served(port, client, attempt, log)
        _round_known(port, redis, attempt + 1)


def _distinct(port: int, n: int) -> None:
    with RawClient(port) as conn:
        conn.request("POST", "/generate?seconds=0.01", body=f'{{"prompt": "other {n}"}}'.encode(),
                     headers={"Connection": "close"})
        conn.read_until(b'{"size":', timeout=10)


def _same_worker_retries(log: Path) -> int:
    """Retries whose client had an earlier attempt on the same worker (what one process sees)."""
    seen: dict[str, list[int]] = collections.defaultdict(list)
    rows = []
    for line in log.read_text().splitlines():
        pid, attempt = line.split()
        if attempt == "-":
            continue  # a distinct request
        client, number = attempt.split(":")
        rows.append((client, int(number), int(pid)))
    flagged = 0
    for client, _number, pid in sorted(rows):
        if pid in seen[client]:
            flagged += 1
        seen[client].append(pid)
    return flagged


def _all_workers_listening(port: int, redis: RedisServer, fleet: str) -> None:
    """Every worker reads the channel: each has heard an event the test writes (the counter is
    summed over the workers), so no retry can land on a worker that is not listening yet."""
    def received() -> float:
        return value(scrape(port), "otel_disconnect_fleet_events_received_total", 'kind="over"')

    def one_probe_heard_by_all() -> bool:
        before = received()
        redis.client().xadd(stream_key(fleet), {"e": events.over(fleet, "test", 0, "-", 1)})
        try:
            wait_for(lambda: received() - before >= WORKERS, 2, interval=0.05)
            return True
        except AssertionError:
            return False  # a worker was not reading yet: probe again

    wait_for(one_probe_heard_by_all, 60, interval=0.1)


def _storm(tmp: Path, redis: RedisServer | None, fleet: str = "default") -> dict[str, float]:
    log = tmp / "requests.log"
    env = (
        {"OTEL_DISCONNECT_REDIS_URL": redis.url, "OTEL_DISCONNECT_FLEET": fleet}
        if redis is not None
        else {}
    )
    xadds = {}
    with fleet_app(tmp / "metrics", WORKERS, FLEET_TEST_LOG=str(log), **env) as port:
        if redis is not None:
            _all_workers_listening(port, redis, fleet)
        probes = redis.commands().get("xadd", 0) if redis is not None else 0
        _storm_rounds(port, log, redis)
        storm = CLIENTS * ATTEMPTS
        wait_for(lambda: value(scrape(port), "otel_disconnect_requests_total", ROUTE) == storm, 30)
        retries = value(scrape(port), "otel_disconnect_retries_after_disconnect_total",
                        'route="/generate"')
        if redis is not None:
            # Every disconnect was heard, so written: the count is final.
            xadds["storm"] = redis.commands().get("xadd", 0) - probes
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda n: _distinct(port, n), range(CLIENTS)))
        total = storm + CLIENTS
        wait_for(lambda: value(scrape(port), "otel_disconnect_requests_total", ROUTE) == total, 30)
        text = scrape(port)
        if redis is not None:
            xadds["distinct"] = redis.commands().get("xadd", 0) - probes - xadds["storm"]
    pids = {line.split()[0] for line in log.read_text().splitlines()}
    return {
        "retries": retries,
        "after_distinct": value(text, "otel_disconnect_retries_after_disconnect_total",
                                'route="/generate"'),
        "same_worker": _same_worker_retries(log),
        "workers_used": len(pids),
        "disconnects": value(
            text, "otel_disconnect_client_disconnects_total",
            'method="POST",outcome="completed",phase="before_response",route="/generate"',
        ),
        **{f"xadd_{k}": float(v) for k, v in xadds.items()},
    }


def _check_storm(run: dict[str, float]) -> None:
    assert run["disconnects"] == CLIENTS * ATTEMPTS, run
    assert run["workers_used"] > 1, run  # the storm did spread over the workers
    # Distinct requests after the disconnects add nothing.
    assert run["after_distinct"] == run["retries"], run


def test_storm_across_workers_without_and_with_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    real_retries = CLIENTS * (ATTEMPTS - 1)
    alone = _storm(tmp_path / "alone", None)
    print(f"without Redis: {alone}")
    _check_storm(alone)
    # One process alone flags exactly the retries that came back to it, however many those are
    # (how the kernel spreads the connections over the workers; under load it can be all).
    assert alone["retries"] == alone["same_worker"], alone
    # On the fleet channel every retry is flagged, wherever it landed. The storm that shows it
    # has a retry that landed on another worker than every earlier attempt of its client: that
    # is up to the kernel, so it is run again (a new fleet: nothing heard before) until one has.
    for run in range(3):
        fleet = _storm(tmp_path / f"fleet{run}", redis_server, fleet=f"storm{run}")
        print(f"with Redis: {fleet}")
        _check_storm(fleet)
        assert fleet["retries"] == real_retries, fleet
        if fleet["same_worker"] < real_retries:
            break
    assert fleet["same_worker"] < real_retries, fleet
    # Redis traffic grows with disconnects only: one XADD each, none for requests that stayed.
    assert fleet["xadd_storm"] == CLIENTS * ATTEMPTS, fleet
    assert fleet["xadd_distinct"] == 0, fleet
