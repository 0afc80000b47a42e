"""Kubernetes: the PrometheusRule and dashboard ConfigMaps ``export`` writes, and the jsonnet mixin,
rendered by the Debian ``jsonnet`` and checked by ``promtool``, against the shipped files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from otel_disconnect.tools.ops import generate
from otel_disconnect.tools.ops.alerts import ALERTS, rules_document
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted(p.name for p in (ROOT / "dashboards").glob("*.json"))


def shipped_rules() -> Any:
    return yaml.safe_load((ROOT / "alerts" / "otel-disconnect.rules.yml").read_text())


def render(expression: str) -> Any:
    jsonnet = require_binary("jsonnet")
    result = subprocess.run(
        [jsonnet, "-J", str(ROOT / "mixin"), "-e", expression],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def promtool_check(rules: Any, tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_the_mixin_renders_to_exactly_the_shipped_rules_and_dashboards() -> None:
    mixin = 'import "mixin/mixin.libsonnet"'
    assert render(f"({mixin}).prometheusAlerts") == shipped_rules() == rules_document()
    dashboards = render(f"({mixin}).grafanaDashboards")
    assert sorted(dashboards) == DASHBOARDS
    for name in DASHBOARDS:
        assert dashboards[name] == json.loads((ROOT / "dashboards" / name).read_text()), name


def test_the_mixin_config_changes_selectors_thresholds_and_for(tmp_path: Path) -> None:
    alerts = render("""
        ((import "mixin/mixin.libsonnet") + {
          _config+:: {
            otelDisconnectSelector: 'job="chat"',
            thresholds+: { ZombieRequests: 7, LLMTokensWastedAfterDisconnectMinRate: '2.5' },
            'for'+: { ZombieRequests: '1m' },
          },
        }).prometheusAlerts
    """)
    rules = {r["alert"]: r for r in alerts["groups"][0]["rules"]}
    shipped = {r["alert"]: r for r in rules_document()["groups"][0]["rules"]}
    assert set(rules) == set(shipped)
    for name, rule in rules.items():
        series = re.findall(r"\botel_disconnect_[a-z0-9_]+(\{[^}]*\})?", rule["expr"])
        assert series, name
        assert all('job="chat"' in matchers for matchers in series), (name, rule["expr"])
    zombies = rules["ZombieRequests"]
    assert zombies["expr"] == (
        'sum by (job, instance) (otel_disconnect_inflight_requests{client="disconnected", '
        'job="chat"}) > 7'
    )
    assert zombies["for"] == "1m"
    assert rules["LLMTokensWastedAfterDisconnect"]["expr"].endswith("> 2.5")
    assert "> 0.1\n" in rules["LLMTokensWastedAfterDisconnect"]["expr"]  # the other kept
    # Still valid rules with the selectors spliced in.
    promtool_check(alerts, tmp_path)


def export_k8s(target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "otel_disconnect",
            "export",
            "--format",
            "prometheus-operator",
            str(target),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def load_objects(directory: Path) -> dict[str, Any]:
    objects = {}
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            objects[f"{document['kind']}/{document['metadata']['name']}"] = document
    return objects


def test_export_prometheus_operator_writes_a_rule_and_sidecar_configmaps(tmp_path: Path) -> None:
    result = export_k8s(
        tmp_path / "k8s", "--namespace", "monitoring", "--label", "release=prometheus"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    objects = load_objects(tmp_path / "k8s")
    rule = objects.pop("PrometheusRule/otel-disconnect")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == shipped_rules()
    promtool_check(rule["spec"], tmp_path)

    assert sorted(objects) == sorted(
        f"ConfigMap/{name.removesuffix('.json')}-dashboard" for name in DASHBOARDS
    )
    for configmap in objects.values():
        assert configmap["apiVersion"] == "v1"
        labels = configmap["metadata"]["labels"]
        assert labels["grafana_dashboard"] == "1"  # a string, as the sidecar matches it
        assert labels["release"] == "prometheus"
        ((name, text),) = configmap["data"].items()
        assert json.loads(text) == json.loads((ROOT / "dashboards" / name).read_text())


def test_export_refuses_to_overwrite_and_rejects_a_bad_label(tmp_path: Path) -> None:
    assert export_k8s(tmp_path).returncode == 0
    again = export_k8s(tmp_path)
    assert again.returncode == 1 and "use --force" in again.stdout
    assert export_k8s(tmp_path, "--force").returncode == 0
    bad = export_k8s(tmp_path / "other", "--label", "novalue")
    assert bad.returncode == 1 and "KEY=VALUE" in bad.stdout


def test_committed_kubernetes_manifests_are_the_default_export(tmp_path: Path) -> None:
    assert export_k8s(tmp_path).returncode == 0
    for path in tmp_path.glob("*.yaml"):
        assert path.read_text() == generate.repository_files()[f"deploy/kubernetes/{path.name}"]
    assert len(list(tmp_path.glob("*.yaml"))) == 1 + len(DASHBOARDS)
