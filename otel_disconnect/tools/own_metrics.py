"""One reading of the package's own ``otel_disconnect_*`` series, for the probe and the demo.

``Reading.from_text(exposition)`` parses a scrape (what the probe reads over HTTP);
``Reading.from_families(registry.collect())`` reads a registry in-process (what the demo reads
each second). Either way the samples are folded by the table below, summed over the labels
a tool does not look at: the figures the probe's verdict and the demo's summary show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from otel_disconnect.telemetry.catalog import PREFIX

IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")


@dataclass
class Reading:
    """The package's series at one moment; ``t`` is seconds into a demo run (0 for a scrape)."""

    t: float = 0.0
    found: bool = False  # any otel_disconnect_* series at all
    requests_by_method: dict[str, float] = field(default_factory=dict)
    disconnects: dict[tuple[str, str], float] = field(default_factory=dict)  # (phase, outcome)
    work_after_sum: float = 0.0
    work_after_count: float = 0.0
    work_after_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative
    tokens: float = 0.0
    tokens_after: float = 0.0
    tokens_undelivered: float = 0.0
    transactions_interrupted: float = 0.0
    connections_left_open: float = 0.0
    retries: float = 0.0
    zombies: float = 0.0  # requests still running for a client that left
    idle_in_transaction: float = 0.0
    orphaned: float = 0.0

    @classmethod
    def from_text(cls, text: str, t: float = 0.0) -> Reading:
        """From a Prometheus text exposition; ``ValueError`` if it is not one."""
        from prometheus_client.parser import text_string_to_metric_families

        return cls.from_families(text_string_to_metric_families(text), t)

    @classmethod
    def from_families(cls, families: Iterable[Any], t: float = 0.0) -> Reading:
        """From metric families (``registry.collect()``: one pass, one pg collector query)."""
        reading = cls(t)
        for family in families:
            for sample in family.samples:
                if sample.name.startswith(PREFIX):
                    reading.found = True
                    reading._add(sample.name[len(PREFIX):], sample.labels, sample.value)
        return reading

    def _add(self, name: str, labels: dict[str, str], value: float) -> None:
        attr = _SUMMED.get(name)
        if attr is not None:
            setattr(self, attr, getattr(self, attr) + value)
            return
        fold = _LABELLED.get(name)
        if fold is not None:
            fold(self, labels, value)

    # -- derived figures ------------------------------------------------------------------------

    @property
    def requests(self) -> float:
        return sum(self.requests_by_method.values())

    @property
    def disconnects_total(self) -> float:
        return sum(self.disconnects.values())

    def by_phase(self) -> dict[str, float]:
        return _sum_by(self.disconnects, 0)

    def by_outcome(self) -> dict[str, float]:
        return _sum_by(self.disconnects, 1)

    def outcomes_in(self, phase: str) -> dict[str, float]:
        return {o: v for (p, o), v in self.disconnects.items() if p == phase}


def _sum_by(counts: dict[tuple[str, str], float], index: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in counts.items():
        out[key[index]] = out.get(key[index], 0.0) + value
    return out


def _add_to(table: dict[Any, float], key: Any, value: float) -> None:
    table[key] = table.get(key, 0.0) + value


# Series summed over all their labels: name (without the prefix) -> Reading attribute.
_SUMMED = {
    "work_after_disconnect_seconds_sum": "work_after_sum",
    "work_after_disconnect_seconds_count": "work_after_count",
    "llm_tokens_total": "tokens",
    "llm_tokens_after_disconnect_total": "tokens_after",
    "llm_tokens_undelivered_total": "tokens_undelivered",
    "db_transactions_interrupted_total": "transactions_interrupted",
    "db_connections_left_open_total": "connections_left_open",
    "retries_after_disconnect_total": "retries",
    "pg_orphaned_transactions": "orphaned",
}

# Series read by one or two of their labels.
_LABELLED: dict[str, Callable[[Reading, dict[str, str], float], None]] = {
    "requests_total": lambda r, labels, v: _add_to(
        r.requests_by_method, labels.get("method", ""), v
    ),
    "client_disconnects_total": lambda r, labels, v: _add_to(
        r.disconnects, (labels.get("phase", ""), labels.get("outcome", "")), v
    ),
    "work_after_disconnect_seconds_bucket": lambda r, labels, v: _add_to(
        r.work_after_buckets, float(labels["le"]), v
    ),
    "inflight_requests": lambda r, labels, v: setattr(
        r, "zombies", r.zombies + (v if labels.get("client") == "disconnected" else 0.0)
    ),
    "pg_backends": lambda r, labels, v: setattr(
        r,
        "idle_in_transaction",
        r.idle_in_transaction + (v if labels.get("state") in IDLE_IN_TRANSACTION else 0.0),
    ),
}
