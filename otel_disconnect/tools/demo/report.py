"""The demo's HTML report: one self-contained file, charts drawn as inline SVG (no script, no
network), readable offline and in any browser."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from otel_disconnect.tools.demo.stats import PHASES, Run, fmt, summary_text
from otel_disconnect.version import __version__

W, H = 480, 230
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 40
PHASE_COLOURS = {"request_body": "#7c3aed", "before_response": "#ea580c", "streaming": "#2563eb"}
RUN_COLOURS = {"baseline": "#dc2626", "cancel": "#16a34a"}

Series = tuple[str, str, Sequence[tuple[float, float]]]  # label, colour, points


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 10.0 ** math.floor(math.log10(value))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= m * step:
            return float(m * step)
    return 10 * step


def _frame(title: str, y_max: float, x_labels: list[tuple[float, str]], x_max: float) -> list[str]:
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    out = [f'<text x="{LEFT}" y="18" class="title">{html.escape(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="plot"/>']
    for i in range(5):
        v = y_max * i / 4
        y = TOP + ph - ph * i / 4
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        label = f"{v:.0f}" if y_max >= 4 else f"{v:.2g}"
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="axis" '
                   f'text-anchor="end">{label}</text>')
    for x, label in x_labels:
        px = LEFT + pw * (x / x_max if x_max else 0)
        out.append(f'<text x="{px:.1f}" y="{TOP + ph + 16}" class="axis" '
                   f'text-anchor="middle">{html.escape(label)}</text>')
    return out


def _legend(items: list[tuple[str, str]]) -> list[str]:
    out, x = [], LEFT
    for label, colour in items:
        out.append(f'<rect x="{x}" y="{H - 14}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{H - 5}" class="axis">{html.escape(label)}</text>')
        x += 22 + 7 * len(label)
    return out


def line_chart(title: str, series: list[Series], x_max: float, unit: str = "s") -> str:
    y_max = _nice_max(max((y for _, _, pts in series for _, y in pts), default=0.0))
    x_max = max(x_max, 1.0)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    ticks = [(x_max * i / 4, f"{x_max * i / 4:.0f} {unit}") for i in range(5)]
    out = _frame(title, y_max, ticks, x_max)
    for _, colour, pts in series:
        if not pts:
            continue
        path = " ".join(f"{LEFT + pw * min(x, x_max) / x_max:.1f},{TOP + ph - ph * y / y_max:.1f}"
                        for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                   f'stroke-width="2.5" class="series"/>')
    out += _legend([(label, colour) for label, colour, _ in series])
    return _svg(out)


def bar_chart(title: str, labels: list[str], groups: list[tuple[str, str, list[float]]]) -> str:
    y_max = _nice_max(max((v for _, _, vs in groups for v in vs), default=0.0))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    n = max(len(labels), 1)
    slot = pw / n
    out = _frame(title, y_max, [(i + 0.5, label) for i, label in enumerate(labels)], n)
    bar = slot * 0.8 / max(len(groups), 1)
    for g, (_, colour, values) in enumerate(groups):
        for i, v in enumerate(values):
            if v <= 0:
                continue
            h = ph * v / y_max
            x = LEFT + slot * i + slot * 0.1 + bar * g
            out.append(f'<rect x="{x:.1f}" y="{TOP + ph - h:.1f}" width="{bar:.1f}" '
                       f'height="{h:.1f}" fill="{colour}" class="series"/>')
    out += _legend([(label, colour) for label, colour, _ in groups])
    return _svg(out)


def _svg(body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" role="img">' + "".join(body) + "</svg>")


def _bucket_label(le: float) -> str:
    if math.isinf(le):
        return "more"
    return f"{le * 1000:.0f}ms" if le < 1 else f"{le:g}s"


def charts(runs: list[Run]) -> list[str]:
    x_max = max(r.duration for r in runs) + 2
    out = []
    for run in runs:
        out.append(line_chart(
            f"Client disconnects by phase ({run.name}, cumulative)",
            [(p, PHASE_COLOURS[p], [(s.t, s.by_phase().get(p, 0.0)) for s in run.samples])
             for p in PHASES], x_max))
    colour = RUN_COLOURS.get
    out.append(line_chart(
        "LLM tokens generated after the client left (cumulative)",
        [(r.name, colour(r.name, "#555"), [(s.t, s.tokens_after) for s in r.samples])
         for r in runs], x_max))
    out.append(line_chart(
        "Idle-in-transaction PostgreSQL backends",
        [(r.name, colour(r.name, "#555"), [(s.t, s.idle_in_transaction) for s in r.samples])
         for r in runs], x_max))
    # Merge the small buckets: the chart reads "how long did work go on for nobody".
    edges = [0.01, 0.1, 0.5, 1, 2.5, 5, 10, math.inf]
    groups = []
    for r in runs:
        counts = [0.0] * len(edges)
        for le, n in r.work_after_histogram():
            counts[next(i for i, e in enumerate(edges) if le <= e)] += n
        groups.append((r.name, colour(r.name, "#555"), counts))
    out.append(bar_chart("Work after disconnect: requests by duration",
                         [f"<={_bucket_label(e)}" if not math.isinf(e) else ">10s" for e in edges],
                         groups))
    return out


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111}
h1{font-size:22px;margin:0 0 4px} p.sub{color:#555;margin:0 0 16px}
.grid2{display:flex;flex-wrap:wrap;gap:16px}
.card{border:1px solid #ddd;border-radius:8px;padding:8px;background:#fff}
svg .title{font-size:13px;font-weight:600} svg .axis{font-size:10px;fill:#444}
svg .plot{fill:#fafafa;stroke:#ccc} svg .grid{stroke:#e5e5e5}
table{border-collapse:collapse;margin:8px 0 20px} td,th{padding:3px 12px;text-align:right}
td:first-child,th:first-child{text-align:left} tr:nth-child(even){background:#f5f5f5}
th{border-bottom:2px solid #333}
"""


def _table(runs: list[Run]) -> str:
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    if len(runs) == 2:
        head += "<th>change</th>"
    rows = []
    for i, (label, _, spec) in enumerate(runs[0].rows()):
        cells = "".join(f"<td>{fmt(r.rows()[i][1], spec)}</td>" for r in runs)
        if len(runs) == 2:
            a, b = runs[0].rows()[i][1], runs[1].rows()[i][1]
            pct = "" if a == 0 else f"{(b - a) / a * 100:+.0f}%"
            cells += f"<td>{pct}</td>"
        rows.append(f"<tr><td>{html.escape(label.strip())}</td>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def render(runs: list[Run]) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    what = ("the gateway as written (baseline) and with cancel_on_disconnect, protect() and "
            "guard_stream() (cancel)" if len(runs) == 2 else "the gateway as written")
    cards = "".join(f'<div class="card">{svg}</div>' for svg in charts(runs))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>otel-disconnect demo report</title><style>{CSS}</style></head>
<body>
<h1>otel-disconnect demo report</h1>
<p class="sub">{len(runs)} run(s) of {runs[0].duration:.0f} s: {html.escape(what)}.
Clients that hang up mid-stream, time out after {runs[0].client_timeout_s:.0f} s and retry,
or give up during upload. otel-disconnect {__version__}, {when}.</p>
{_table(runs)}
<div class="grid2">{cards}</div>
<pre style="display:none">{html.escape(summary_text(runs))}</pre>
</body></html>
"""


def write_report(path: Path, runs: list[Run]) -> Path:
    path.write_text(render(runs), encoding="utf-8")
    return path
