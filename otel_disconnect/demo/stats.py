"""What the demo reads back from the gateway's metrics: one ``Sample`` per second of a run, and
the figures the summary, the live view and the report show.

Read from the Prometheus registry the app writes to (what ``/metrics`` serves), so the demo
shows exactly what a Prometheus scraping the app would see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..telemetry.metrics import PREFIX, WORK_AFTER_BUCKETS

PHASES = ("request_body", "before_response", "streaming")
IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")


@dataclass
class Sample:
    """The gateway's counters and gauges at one moment (``t`` seconds into the run)."""

    t: float
    requests: float = 0.0
    disconnects: dict[str, float] = field(default_factory=dict)  # by phase
    outcomes: dict[str, float] = field(default_factory=dict)
    work_after_sum: float = 0.0
    work_after_count: float = 0.0
    work_after_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative
    tokens: float = 0.0
    tokens_after: float = 0.0
    tokens_undelivered: float = 0.0
    transactions_interrupted: float = 0.0
    connections_left_open: float = 0.0
    retries: float = 0.0
    zombies: float = 0.0
    idle_in_transaction: float = 0.0
    orphaned: float = 0.0

    @property
    def disconnects_total(self) -> float:
        return sum(self.disconnects.values())


def take_sample(families: Iterable[Any], t: float) -> Sample:
    """A Sample from ``registry.collect()`` (one pass, so the pg collector queries once)."""
    s = Sample(t)
    for family in families:
        for name, labels, value in ((m.name, m.labels, m.value) for m in family.samples):
            _add(s, name.removeprefix(PREFIX), labels, value)
    return s


def _add(s: Sample, name: str, labels: dict[str, str], value: float) -> None:
    if name == "requests_total":
        s.requests += value
    elif name == "client_disconnects_total":
        phase, outcome = labels.get("phase", ""), labels.get("outcome", "")
        s.disconnects[phase] = s.disconnects.get(phase, 0.0) + value
        s.outcomes[outcome] = s.outcomes.get(outcome, 0.0) + value
    elif name == "work_after_disconnect_seconds_sum":
        s.work_after_sum += value
    elif name == "work_after_disconnect_seconds_count":
        s.work_after_count += value
    elif name == "work_after_disconnect_seconds_bucket":
        le = float(labels["le"])
        s.work_after_buckets[le] = s.work_after_buckets.get(le, 0.0) + value
    elif name == "llm_tokens_total":
        s.tokens += value
    elif name == "llm_tokens_after_disconnect_total":
        s.tokens_after += value
    elif name == "llm_tokens_undelivered_total":
        s.tokens_undelivered += value
    elif name == "db_transactions_interrupted_total":
        s.transactions_interrupted += value
    elif name == "db_connections_left_open_total":
        s.connections_left_open += value
    elif name == "retries_after_disconnect_total":
        s.retries += value
    elif name == "inflight_requests" and labels.get("client") == "disconnected":
        s.zombies += value
    elif name == "pg_backends" and labels.get("state") in IDLE_IN_TRANSACTION:
        s.idle_in_transaction += value
    elif name == "pg_orphaned_transactions":
        s.orphaned += value


@dataclass
class Run:
    """One phase of the demo: the gateway as written (``safe=False``) or with cancellation."""

    name: str
    safe: bool
    duration: float
    client_timeout_s: float = 10.0
    samples: list[Sample] = field(default_factory=list)
    client_line: str = ""

    @property
    def final(self) -> Sample:
        return self.samples[-1] if self.samples else Sample(0.0)

    def peak(self, attr: str) -> float:
        return max((getattr(s, attr) for s in self.samples), default=0.0)

    def work_after_histogram(self) -> list[tuple[float, float]]:
        """(upper bound, count in this bucket), non-cumulative, for the report's bars."""
        buckets = self.final.work_after_buckets
        out, previous = [], 0.0
        for le in [*WORK_AFTER_BUCKETS, float("inf")]:
            cumulative = buckets.get(le, previous)
            out.append((le, cumulative - previous))
            previous = cumulative
        return out

    def rows(self) -> list[tuple[str, float, str]]:
        """(label, value, format) of the summary, in order."""
        f = self.final
        rows = [("requests", f.requests, "d"),
                ("client disconnects", f.disconnects_total, "d")]
        rows += [(f"  in {phase}", f.disconnects.get(phase, 0.0), "d") for phase in PHASES]
        rows += [
            ("  outcome cancelled", f.outcomes.get("cancelled", 0.0), "d"),
            ("  outcome completed anyway", f.outcomes.get("completed", 0.0), "d"),
            ("work after disconnect (s)", f.work_after_sum, ".1f"),
            ("LLM tokens generated", f.tokens, "d"),
            ("LLM tokens after disconnect", f.tokens_after, "d"),
            ("transactions interrupted", f.transactions_interrupted, "d"),
            ("connections left open", f.connections_left_open, "d"),
            ("peak idle-in-transaction backends", self.peak("idle_in_transaction"), "d"),
            ("zombie requests still running", f.zombies, "d"),
        ]
        return rows


def fmt(value: float, spec: str) -> str:
    return f"{round(value):d}" if spec == "d" else format(value, spec)


def change(before: float, after: float) -> str:
    if before == 0:
        return "" if after == 0 else "new"
    return f"{(after - before) / before * 100:+.0f}%"


def summary_text(runs: list[Run]) -> str:
    """The summary table: one column per run, and the change when there are two."""
    labels = [label for label, _, _ in runs[0].rows()]
    columns = [[fmt(v, spec) for _, v, spec in run.rows()] for run in runs]
    headers = [run.name for run in runs]
    if len(runs) == 2:
        values = [[v for _, v, _ in run.rows()] for run in runs]
        columns.append([change(a, b) for a, b in zip(values[0], values[1], strict=True)])
        headers.append("change")
    width = max(len(label) for label in labels) + 2
    widths = [max(len(h), *(len(c) for c in col)) + 2 for h, col in zip(headers, columns,
                                                                          strict=True)]
    lines = ["".ljust(width) + "".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    for i, label in enumerate(labels):
        lines.append(label.ljust(width) + "".join(
            col[i].rjust(w) for col, w in zip(columns, widths, strict=True)))
    return "\n".join(lines)
