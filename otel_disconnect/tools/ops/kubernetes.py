"""The rules and dashboards as Kubernetes objects for the Prometheus Operator and Grafana.

A ``PrometheusRule`` (``monitoring.coreos.com/v1``) whose ``spec`` is the shipped rule file, and
one ``ConfigMap`` per dashboard labelled ``grafana_dashboard: "1"``, the label Grafana's dashboard
sidecar (the Grafana Helm chart, kube-prometheus-stack) watches for by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from otel_disconnect.tools.ops import yaml_out
from otel_disconnect.tools.ops.alerts import rules_document
from otel_disconnect.tools.ops.grafana import Dashboard

NAME = "otel-disconnect"
COMMON_LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": NAME}
SIDECAR_LABEL = ("grafana_dashboard", "1")


def _metadata(name: str, namespace: str | None, labels: Mapping[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {**COMMON_LABELS, **labels}
    return metadata


def prometheus_rule(
    namespace: str | None = None, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``labels`` are added for the operator's ``ruleSelector`` (e.g. ``release: prometheus``)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(NAME, namespace, labels or {}),
        "spec": rules_document(),
    }


def dashboard_configmap(
    dashboard: Dashboard,
    text: str,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    name = dashboard.filename.removesuffix(".json")
    key, value = SIDECAR_LABEL
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(f"{name}-dashboard", namespace, {key: value, **(labels or {})}),
        "data": {dashboard.filename: text},
    }


def manifests(
    namespace: str | None = None, labels: Mapping[str, str] | None = None
) -> dict[str, str]:
    """File name -> YAML text, one object per file, for ``kubectl apply -f DIR``."""
    from otel_disconnect.tools.ops.generate import DASHBOARDS, HEADER, dashboard_text

    header = HEADER + "\nApply with: kubectl apply -f DIR (see the README, Kubernetes)."
    files = {"prometheusrule.yaml": yaml_out.dump(prometheus_rule(namespace, labels), header)}
    for dashboard in DASHBOARDS:
        configmap = dashboard_configmap(dashboard, dashboard_text(dashboard), namespace, labels)
        files[f"{configmap['metadata']['name']}.configmap.yaml"] = yaml_out.dump(configmap, header)
    return files
