"""The compose stack's files: they parse, every mounted path exists, every target is a service,
and Prometheus and Alertmanager accept their configs with the rules mounted as in the stack."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from otel_disconnect.tools.ops import provisioning
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_SERVICES = {"postgres", "app", "llm-sim", "loadgen", "prometheus", "alertmanager",
                     "grafana", "otel-collector", "jaeger", "vllm"}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text("utf-8"))
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def mounts(service: str) -> dict[str, Path]:
    """container path -> host path of the service's bind mounts."""
    out = {}
    for volume in services()[service].get("volumes", []):
        host, container = volume.split(":")[:2]
        out[container] = (ROOT / host).resolve()
    return out


def listening(service: str) -> set[int]:
    spec = services()[service]
    ports = {int(p) for p in spec.get("expose", [])}
    ports |= {int(str(p).split(":")[-1]) for p in spec.get("ports", [])}
    return ports


def assert_target(target: str, what: str) -> None:
    host, port = target.rsplit(":", 1)
    assert host in services(), f"{what}: {host} is not a compose service"
    assert int(port) in listening(host), f"{what}: {host} does not listen on {port}"


def test_every_service_the_spec_lists() -> None:
    assert set(services()) >= REQUIRED_SERVICES
    assert services()["vllm"]["profiles"] == ["vllm"]
    assert "otel_disconnect.DisconnectMiddleware" in services()["vllm"]["command"]
    gpu = services()["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_every_mounted_path_and_build_context_exists() -> None:
    for name, spec in services().items():
        for container, host in mounts(name).items():
            assert host.exists(), f"{name}: {host} (for {container}) does not exist"
        build = spec.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile",
                                                                                "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile}"
        for dep in spec.get("depends_on", []):
            assert dep in services(), f"{name} depends on unknown {dep}"


def test_every_scrape_and_alerting_target_is_a_service_port() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text("utf-8"))
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert len(targets) >= 4
    for target in targets:
        assert_target(target, "scrape target")
    for am in config["alerting"]["alertmanagers"]:
        for sc in am["static_configs"]:
            for target in sc["targets"]:
                assert_target(target, "alertmanager")


def test_promtool_check_config_with_the_rules_mounted_as_in_compose(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    # Rebuild the container's /etc/prometheus from the compose mounts, so relative rule_files
    # resolve exactly as they do in the stack.
    for container, host in mounts("prometheus").items():
        assert container.startswith("/etc/prometheus/"), container
        dest = tmp_path / container.removeprefix("/etc/prometheus/")
        if host.is_dir():
            shutil.copytree(host, dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(host, dest)
    done = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          check=False, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "otel-disconnect.rules.yml" in output and "SUCCESS: 1 rule files found" in output


def test_alertmanager_config_routes_to_the_webhook_service() -> None:
    amtool = shutil.which("amtool")
    config = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text("utf-8"))
    receiver = config["route"]["receiver"]
    hooks = [h for r in config["receivers"] if r["name"] == receiver
             for h in r["webhook_configs"]]
    assert hooks
    host_port = hooks[0]["url"].split("//", 1)[1].split("/", 1)[0]
    assert_target(host_port, "webhook")
    assert services()["alert-log"]["command"][:2] == ["otel-disconnect", "webhook"]
    if amtool is not None:  # shipped with Debian's prometheus-alertmanager
        done = subprocess.run([amtool, "check-config",
                               str(ROOT / "deploy/alertmanager/alertmanager.yml")],
                              check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_collector_config_sends_traces_to_the_trace_ui() -> None:
    config = yaml.safe_load((ROOT / "deploy/otel-collector/config.yaml").read_text("utf-8"))
    pipeline = config["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for name in pipeline[kind]:
            assert name in config[kind], f"{kind}: {name} is not defined"
    assert "otlp" in pipeline["receivers"]
    for name in pipeline["exporters"]:
        assert_target(config["exporters"][name]["endpoint"], f"collector exporter {name}")
    for protocol in config["receivers"]["otlp"]["protocols"].values():
        port = int(protocol["endpoint"].rsplit(":", 1)[1])
        assert port in listening("otel-collector")
    endpoint = services()["app"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert_target(endpoint.split("//", 1)[1], "app OTLP endpoint")


def test_grafana_provisioning_matches_the_mounts() -> None:
    grafana = mounts("grafana")
    prov = grafana["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((prov / "datasources/otel-disconnect.yml").read_text("utf-8"))
    source = datasources["datasources"][0]
    assert source["uid"] == provisioning.DATASOURCE_UID and source["type"] == "prometheus"
    assert_target(source["url"].split("//", 1)[1], "Grafana datasource")
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text("utf-8"))
    assert source["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    providers = yaml.safe_load((prov / "dashboards/otel-disconnect.yml").read_text("utf-8"))
    path = providers["providers"][0]["options"]["path"]
    assert grafana[path] == (ROOT / "dashboards").resolve()
    assert sorted(p.name for p in grafana[path].glob("*.json")) == [
        "otel-disconnect-db.json", "otel-disconnect-llm.json", "otel-disconnect-overview.json"]
