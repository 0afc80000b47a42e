"""Grafana dashboard JSON from small Python descriptions.

A panel says what it shows (PromQL, unit, description) and which telemetry source it needs
(``app``: the instrumented app; ``llm``: token counting, vLLM and DCGM series; ``pg``: database
hooks and the PostgreSQL collector; ``retry``: retry-after-disconnect detection; ``fleet``: the
Redis fleet channel), so a test can check that every panel of a wired source returns data. Layout
is computed: panels flow left to right on Grafana's 24-column grid; a panel whose ``row`` differs
from the one before it starts a row, under a row header of that title.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 39
SOURCES = ("app", "llm", "pg", "retry", "fleet")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TAGS = ["otel-disconnect"]


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    heatmap: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    source: str
    kind: str = "timeseries"  # timeseries | stat | heatmap
    width: int = 12
    height: int = 8
    red_above: float | None = None
    mappings: tuple[dict[str, Any], ...] = ()
    row: str = ""  # the title of the row it belongs to; "" before the first row

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"panel {self.title!r}: unknown source {self.source!r}")
        if self.kind not in ("timeseries", "stat", "heatmap"):
            raise ValueError(f"panel {self.title!r}: unknown kind {self.kind!r}")


@dataclass(frozen=True)
class Variable:
    """A query variable over one label; multi-select, "All" matches everything (``.*``)."""

    name: str
    label: str
    metric: str

    def to_json(self) -> dict[str, Any]:
        query = f"label_values({self.metric}, {self.name})"
        return {
            "name": self.name,
            "label": self.label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "refresh": 2,
            "regex": "",
            "sort": 1,
            "hide": 0,
        }


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = field(default=())

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"

    def to_json(self) -> dict[str, Any]:
        return {
            "annotations": {"list": [_builtin_annotations()]},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": [{
                "asDropdown": False, "icon": "external link", "includeVars": False,
                "keepTime": True, "tags": TAGS, "targetBlank": False,
                "title": "otel-disconnect", "type": "dashboards",
            }],
            "panels": _layout(self.panels),
            "refresh": "30s",
            "schemaVersion": SCHEMA_VERSION,
            "tags": TAGS,
            "templating": {
                "list": [_datasource_variable(), *(v.to_json() for v in self.variables)],
            },
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "browser",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
            "weekStart": "",
        }


def _builtin_annotations() -> dict[str, Any]:
    return {
        "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
        "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
        "type": "dashboard",
    }


def _datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [],
        "refresh": 1, "regex": "",
    }


def _layout(panels: tuple[Panel, ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    x = y = row_height = 0
    row = ""
    for panel in panels:
        if panel.row != row:
            row = panel.row
            x, y, row_height = 0, y + row_height, 0
            out.append(_row_json(row, len(out) + 1, y))
            y += 1
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        grid = {"h": panel.height, "w": panel.width, "x": x, "y": y}
        out.append(_panel_json(panel, len(out) + 1, grid))
        x += panel.width
        row_height = max(row_height, panel.height)
    return out


def _row_json(title: str, number: int, y: int) -> dict[str, Any]:
    return {
        "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "id": number,
        "panels": [], "title": title, "type": "row",
    }


def _thresholds(red_above: float | None) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if red_above is not None:
        steps.append({"color": "red", "value": red_above})
    return {"mode": "absolute", "steps": steps}


def _target(target: Target, ref: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "datasource": DATASOURCE, "editorMode": "code", "expr": target.expr,
        "legendFormat": target.legend or "__auto", "range": True, "refId": ref,
    }
    if target.heatmap:
        out["format"] = "heatmap"
    return out


def _panel_json(panel: Panel, number: int, grid: dict[str, int]) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": _thresholds(panel.red_above),
        "mappings": list(panel.mappings),
    }
    options: dict[str, Any]
    if panel.kind == "timeseries":
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {
            "drawStyle": "line", "fillOpacity": 10, "lineWidth": 1, "showPoints": "never",
            "spanNulls": False, "stacking": {"group": "A", "mode": "none"},
            "thresholdsStyle": {"mode": "line" if panel.red_above is not None else "off"},
        }
        options = {
            "legend": {"calcs": ["mean", "max"], "displayMode": "table", "placement": "bottom",
                       "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
            "orientation": "auto", "textMode": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        }
    else:  # heatmap of a Prometheus histogram: Grafana draws the buckets as they are
        options = {
            "calculate": False, "cellGap": 1,
            "color": {"exponent": 0.5, "fill": "dark-orange", "mode": "scheme",
                      "scheme": "Oranges", "steps": 64},
            "legend": {"show": True}, "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "unit": panel.unit},
        }
    return {
        "datasource": DATASOURCE,
        "description": panel.description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": grid,
        "id": number,
        "options": options,
        "targets": [_target(t, chr(ord("A") + i)) for i, t in enumerate(panel.targets)],
        "title": panel.title,
        "type": panel.kind,
    }
