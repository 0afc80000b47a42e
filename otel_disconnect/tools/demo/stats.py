"""What the demo reads back from the gateway's metrics: one ``Sample`` per second of a run, and
the figures the summary, the live view and the report show.

Read from the Prometheus registry the app writes to (what ``/metrics`` serves), so the demo
shows exactly what a Prometheus scraping the app would see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from otel_disconnect.telemetry.metrics import WORK_AFTER_BUCKETS
from otel_disconnect.tools.own_metrics import Reading

PHASES = ("request_body", "before_response", "streaming")


# One reading per second of a run: the probe's reader of the package's own series.
Sample = Reading


def take_sample(families: Iterable[Any], t: float) -> Sample:
    """A Sample from ``registry.collect()`` (one pass, so the pg collector queries once)."""
    return Reading.from_families(families, t)


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
        rows += [(f"  in {phase}", f.by_phase().get(phase, 0.0), "d") for phase in PHASES]
        rows += [
            ("  outcome cancelled", f.by_outcome().get("cancelled", 0.0), "d"),
            ("  outcome completed anyway", f.by_outcome().get("completed", 0.0), "d"),
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
