"""Grafana provisioning for the dashboards: a Prometheus datasource with a fixed uid and a file
provider. The paths and URL are those of docker-compose.yml; edit them after ``export`` for
another deployment."""

from __future__ import annotations

from typing import Any

DATASOURCE_UID = "otel-disconnect-prometheus"
PROMETHEUS_URL = "http://prometheus:9090"
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/otel-disconnect"
# Grafana computes $__rate_interval from this; keep it equal to Prometheus' scrape_interval.
SCRAPE_INTERVAL = "5s"


def datasources() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "datasources": [{
            "name": "Prometheus",
            "uid": DATASOURCE_UID,
            "type": "prometheus",
            "access": "proxy",
            "url": PROMETHEUS_URL,
            "isDefault": True,
            "editable": False,
            "jsonData": {"timeInterval": SCRAPE_INTERVAL, "httpMethod": "POST"},
        }],
    }


def dashboard_providers() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [{
            "name": "otel-disconnect",
            "orgId": 1,
            "folder": "otel-disconnect",
            "type": "file",
            "disableDeletion": False,
            "allowUiUpdates": False,
            "updateIntervalSeconds": 30,
            "options": {"path": DASHBOARDS_PATH, "foldersFromFilesStructure": False},
        }],
    }
