"""The Grafana conventions the dashboards keep (README: Dashboards, alerts, the whole stack),
checked on the committed dashboard JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from otel_disconnect.telemetry import metrics as metric_defs
from otel_disconnect.tools.ops.generate import DASHBOARDS

ROOT = Path(__file__).resolve().parents[2]
FILES = ("otel-disconnect-overview.json", "otel-disconnect-llm.json", "otel-disconnect-db.json")
DS = {"type": "prometheus", "uid": "${datasource}"}


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "dashboards" / name).read_text(encoding="utf-8"))
    return data


def graphs(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that query, without the row headers."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in graphs(dashboard) for t in p["targets"]]


def test_the_three_dashboards_exist_with_unique_fixed_uids() -> None:
    assert sorted(d.filename for d in DASHBOARDS) == sorted(FILES)
    uids = [load(name)["uid"] for name in FILES]
    assert len(set(uids)) == 3
    assert all(re.fullmatch(r"[a-z0-9-]{1,40}", uid) for uid in uids)


@pytest.mark.parametrize("name", FILES)
def test_dashboard_conventions(name: str) -> None:
    d = load(name)
    assert 39 <= d["schemaVersion"] <= 42
    assert d["id"] is None, "a fixed id breaks import into another Grafana"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DS
    panel_ids = [p["id"] for p in d["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    for row in (p for p in d["panels"] if p["type"] == "row"):
        assert row["title"] and not row["collapsed"] and row["panels"] == [], row
        assert row["gridPos"] == {"h": 1, "w": 24, "x": 0, "y": row["gridPos"]["y"]}, row
    for panel in graphs(d):
        where = f"{name}: {panel['title']!r}"
        assert panel["datasource"] == DS, where
        assert panel["description"].strip(), where
        assert panel["fieldConfig"]["defaults"]["unit"], where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"] == DS, where
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, where


@pytest.mark.parametrize("name", FILES)
def test_every_range_is_rate_interval(name: str) -> None:
    for expr in exprs(load(name)):
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        for window in ranges:
            # A subquery over the dashboard range is the one exception (energy over the range).
            assert window in ("$__rate_interval", "$__range:$__interval"), (expr, window)
        calls = len(re.findall(r"\b(rate|irate|increase)\(", expr))
        assert calls <= expr.count("[$__rate_interval]"), expr


@pytest.mark.parametrize("name", FILES)
def test_every_referenced_metric_is_a_known_name(name: str) -> None:
    known = _known_metrics()
    for expr in exprs(load(name)):
        for metric in re.findall(r"\b(otel_disconnect_[a-z_]+)", expr):
            assert metric in known, (metric, expr)


def _known_metrics() -> set[str]:
    """Exposed sample names of docs/reference.md (metrics.py) and of the pg collector, and the
    fleet channel's (fleet/metrics.py)."""
    from prometheus_client import CollectorRegistry

    from otel_disconnect.fleet.metrics import FleetMetrics

    registry = CollectorRegistry()
    collectors = [*vars(metric_defs.Metrics(registry)).values(),
                  *vars(FleetMetrics(registry)).values()]
    names: set[str] = set()
    for value in collectors:
        describe = getattr(value, "describe", None)
        if describe is None:
            continue
        for family in describe():
            base = family.name
            if family.type == "counter":
                names.add(base + "_total")
            elif family.type == "histogram":
                names |= {base + "_bucket", base + "_sum", base + "_count"}
            else:
                names.add(base)
    pg = ("backends", "idle_in_transaction_max_seconds", "transaction_max_age_seconds",
          "orphaned_transactions", "idle_in_transaction_session_timeout_seconds", "up")
    return names | {f"otel_disconnect_pg_{n}" for n in pg}


def test_overview_shows_what_the_issue_asks_for() -> None:
    text = " ".join(exprs(load("otel-disconnect-overview.json")))
    for metric in ("client_disconnects_total", "client_wait_seconds_bucket",
                   "work_after_disconnect_seconds", "inflight_requests",
                   "retries_after_disconnect_total"):
        assert "otel_disconnect_" + metric in text
    # The 10 s client timeout band is read from the le="10.0" bucket, which must exist.
    assert 10 in metric_defs.CLIENT_WAIT_BUCKETS and 30 in metric_defs.CLIENT_WAIT_BUCKETS
    # Matched as "10" or "10.0": the collector's translation writes the bound without ".0".
    assert 'le=~"10(\\\\.0)?"' in text and 'le=~"5(\\\\.0)?"' in text


def test_overview_has_a_fleet_channel_row() -> None:
    panels = load("otel-disconnect-overview.json")["panels"]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    assert [panels[i]["title"] for i in rows] == ["Fleet channel (Redis)"]
    below = panels[rows[0] + 1:]
    assert below and all(p["gridPos"]["y"] > panels[rows[0]]["gridPos"]["y"] for p in below)
    text = " ".join(t["expr"] for p in below for t in p["targets"])
    assert "min by (job, instance) (otel_disconnect_fleet_channel_up)" in text
    for metric in ("events_queued", "events_published_total", "events_received_total",
                   "events_dropped_total"):
        assert "otel_disconnect_fleet_" + metric in text, metric
    assert "fleet" not in " ".join(exprs({"panels": panels[: rows[0]]}))


def test_llm_dashboard_shows_vllm_and_power() -> None:
    d = load("otel-disconnect-llm.json")
    text = " ".join(exprs(d))
    for series in ("vllm:num_requests_running", "vllm:generation_tokens_total",
                   "vllm:request_success_total", "vllm:kv_cache_usage_perc",
                   "DCGM_FI_DEV_POWER_USAGE", "otel_disconnect_llm_tokens_undelivered_total",
                   "otel_disconnect_llm_generation_after_disconnect_seconds"):
        assert series in text, series
    assert "finished_reason" in text
    energy = [p for p in d["panels"] if "energy" in p["title"].lower()]
    assert energy and "estimate" in energy[0]["description"].lower()


def test_db_dashboard_shows_what_the_issue_asks_for() -> None:
    text = " ".join(exprs(load("otel-disconnect-db.json")))
    for metric in ("db_transactions_interrupted_total", "db_connections_left_open_total",
                   "db_checkins_total", "pg_backends", "pg_idle_in_transaction_max_seconds",
                   "pg_orphaned_transactions", "pg_idle_in_transaction_session_timeout_seconds"):
        assert "otel_disconnect_" + metric in text, metric
    assert "by (application_name)" in text
