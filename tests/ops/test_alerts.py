"""The alert rules: promtool accepts and tests them, and every alert is tested and documented."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_disconnect.tools.ops.alerts import ALERTS, RUNBOOK_BASE
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "otel-disconnect.rules.yml"
TESTS = sorted((ROOT / "alerts" / "tests").glob("*.yml"))
REQUIRED = {
    "IdleInTransactionTooLong", "OrphanedTransactionAfterDisconnect",
    "DBConnectionsLeftOpenAfterCancel", "DBPoolConnectionsTerminated",
    "LLMTokensWastedAfterDisconnect", "GPUGeneratingForDisconnectedClients", "ZombieRequests",
    "ClientsAbandonBeforeResponse", "RetryStormAfterDisconnect", "IdleInTransactionTimeoutDisabled",
}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [r for group in doc["groups"] for r in group["rules"]]


def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_promtool_test_rules() -> None:
    promtool = require_binary("promtool")
    assert TESTS
    done = subprocess.run([promtool, "test", "rules", *map(str, TESTS)], check=False,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "FAILED" not in done.stdout


def test_every_required_alert_is_there_with_severity_and_annotations() -> None:
    found = {r["alert"]: r for r in rules()}
    assert set(found) >= REQUIRED
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        notes = rule["annotations"]
        assert notes["summary"].endswith(".") and "{{" not in notes["summary"], name
        assert "{{" in notes["description"] and "$" in notes["description"], name
        assert notes["runbook_url"].startswith(RUNBOOK_BASE + "#"), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name


def _github_anchors(markdown: str) -> dict[str, str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors: dict[str, str] = {}
    current = None
    for line in markdown.splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            current = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchors[current] = ""
        elif current is not None:
            anchors[current] += line + "\n"
    return anchors


def test_every_runbook_url_points_at_a_full_runbook_section() -> None:
    sections = _github_anchors((ROOT / "docs" / "runbooks.md").read_text(encoding="utf-8"))
    for rule in rules():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in sections, f"docs/runbooks.md has no #{anchor}"
        body = sections[anchor]
        for part in ("What it means.", "How to confirm.", "How to fix.", "Why this threshold."):
            assert part in body, f"#{anchor} lacks {part!r}"
        assert rule["labels"]["severity"] in body


def _tests_by_alert() -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    found: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for path in TESTS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in doc["tests"]:
            for case in group.get("alert_rule_test", []):
                found.setdefault(case["alertname"], []).append((group, case))
    return found


def _seconds(duration: str) -> int:
    value, unit = int(duration[:-1]), duration[-1]
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_each_alert_is_tested_before_and_after_its_for(rule: dict[str, Any]) -> None:
    cases = _tests_by_alert().get(rule["alert"], [])
    quiet = [(g, c) for g, c in cases if c["exp_alerts"] == []]
    firing = [(g, c) for g, c in cases if c["exp_alerts"]]
    assert quiet and firing, f"{rule['alert']}: needs a not-yet-firing and a firing case"
    for group, case in quiet:
        # The same group proves the condition already holds then: the alert is pending.
        pending = [t for t in group.get("promql_expr_test", [])
                   if rule["alert"] in t["expr"] and t["eval_time"] == case["eval_time"]]
        assert pending and 'alertstate="pending"' in pending[0]["exp_samples"][0]["labels"]
        assert _seconds(case["eval_time"]) < _seconds(rule["for"]) + 60 * 10
    for _, case in firing:
        assert _seconds(case["eval_time"]) >= _seconds(rule["for"])
        for alert in case["exp_alerts"]:
            assert alert["exp_labels"]["severity"] == rule["labels"]["severity"]
            assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}
