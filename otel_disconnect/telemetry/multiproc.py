"""Multi-process exposition (``PROMETHEUS_MULTIPROC_DIR``): what one scrape of one worker serves.

prometheus-client's ``MultiProcessCollector`` adds up the metric files every worker writes; the
collectors that compute at scrape time (``PgActivityCollector``, any collector an app registers)
write no files, so they are served from the process that answers, next to it. ``livesum``
gauges (the in-flight requests) must forget a worker once it is dead: gunicorn can say so from
its ``child_exit`` hook (``multiprocess.mark_process_dead(worker.pid)``); uvicorn's
``--workers`` has no such hook, so every scrape looks for live-gauge files of processes that no
longer exist and marks those dead, and each worker marks itself dead when it exits normally.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.core import Metric

# Per-worker figures: served from whichever worker answered they would read as the service's.
_PER_PROCESS_PREFIXES = ("process_",)

# prometheus-client names a live gauge's file gauge_<mode>_<pid>.db (``values.py``; the same
# pattern ``mark_process_dead`` deletes). The only place this layout is relied on.
_LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


class MultiprocessExposition:
    """Every worker's metrics from the shared files, then this process's other families.

    Metrics backed by the shared files appear in both sources: every worker's values from the
    files, this process's share of them from ``source``. Only the former is served.
    """

    def __init__(self, source: CollectorRegistry, path: str) -> None:
        self._source = source
        self._shared = multiprocess.MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        served = set()
        for family in self._shared.collect():  # type: ignore[no-untyped-call]
            served.add(family.name)
            yield family
        for family in self._source.collect():
            if family.name in served or family.name.startswith(_PER_PROCESS_PREFIXES):
                continue
            yield family


def dead_worker_pids(path: str) -> set[int]:
    """Pids that have live-gauge files in ``path`` but no running process."""
    pids: set[int] = set()
    try:
        names = os.listdir(path)
    except OSError:
        return pids
    for name in names:
        match = _LIVE_FILE.match(name)
        if match and not _alive(int(match.group(1))):
            pids.add(int(match.group(1)))
    return pids


def sweep_dead_workers(path: str) -> None:
    for pid in dead_worker_pids(path):
        # FileNotFoundError: another worker's scrape removed it first.
        with contextlib.suppress(FileNotFoundError):
            multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


_exit_hook: list[int] = []


def mark_dead_at_exit(path: str) -> None:
    """At a normal exit, take this worker out of the live gauges (prometheus-client's API)."""
    pid = os.getpid()
    if pid in _exit_hook:
        return
    _exit_hook.append(pid)
    atexit.register(_mark_self_dead, pid, path)


def _mark_self_dead(pid: int, path: str) -> None:
    if os.getpid() == pid:  # not in a child forked after registering
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
