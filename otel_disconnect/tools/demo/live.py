"""The demo's live view: a small block redrawn every second on a terminal, one line every few
seconds otherwise (CI logs, pipes). Plain ANSI, no dependency."""

from __future__ import annotations

from typing import TextIO

from otel_disconnect.tools.demo.stats import PHASES, Sample

LOG_EVERY_S = 5.0


def lines(name: str, s: Sample, duration: float) -> list[str]:
    phases = "  ".join(f"{p} {s.by_phase().get(p, 0):.0f}" for p in PHASES)
    return [
        f"otel-disconnect demo [{name}]  {s.t:4.0f}/{duration:.0f} s   "
        f"requests {s.requests:.0f}",
        f"  client disconnects  {s.disconnects_total:5.0f}   ({phases})",
        f"  zombie requests now {s.zombies:5.0f}   work after disconnect {s.work_after_sum:7.1f} s",
        f"  LLM tokens after disconnect {s.tokens_after:7.0f} of {s.tokens:.0f} generated",
        f"  transactions interrupted {s.transactions_interrupted:5.0f}   "
        f"idle-in-transaction backends now {s.idle_in_transaction:3.0f} "
        f"(orphaned {s.orphaned:.0f})",
    ]


class LiveView:
    def __init__(self, out: TextIO, name: str, duration: float, tty: bool | None = None) -> None:
        self.out = out
        self.name = name
        self.duration = duration
        self.tty = out.isatty() if tty is None else tty
        self._drawn = 0
        self._last_log = -LOG_EVERY_S

    def update(self, s: Sample) -> None:
        if self.tty:
            text = lines(self.name, s, self.duration)
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in text))
            self._drawn = len(text)
        elif s.t - self._last_log >= LOG_EVERY_S:
            self._last_log = s.t
            self.out.write(
                f"[{self.name} {s.t:3.0f}s] requests {s.requests:.0f}, disconnects "
                f"{s.disconnects_total:.0f}, tokens after disconnect {s.tokens_after:.0f}, "
                f"transactions interrupted {s.transactions_interrupted:.0f}, "
                f"idle in transaction {s.idle_in_transaction:.0f}\n"
            )
        self.out.flush()
