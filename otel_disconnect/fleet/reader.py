"""The pg-exporter's reader: the fleet channel, read-only, on its own thread and event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from prometheus_client import CollectorRegistry

from .channel import FleetChannel
from .orphans import Claims


class ClaimsReader:
    """Fills ``claims`` from the fleet's stream, starting with every event Redis still keeps."""

    def __init__(self, url: str, fleet: str, registry: CollectorRegistry | None) -> None:
        self.claims = Claims()
        self.channel = FleetChannel(
            url, fleet, self.claims.on_event, registry=registry, write=False, from_start=True
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, name="otel-disconnect fleet reader", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self.channel.ensure_started()
        await asyncio.gather(*self.channel.tasks, return_exceptions=True)

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(self.channel.aclose(), self._loop)
        with contextlib.suppress(Exception):  # stopping anyway
            future.result(timeout=5)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
