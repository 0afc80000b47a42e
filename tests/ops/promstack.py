"""Real Prometheus and Alertmanager processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.servers import free_port, wait_for


class Process:
    def __init__(
        self, name: str, argv: list[str], workdir: Path, port: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=workdir, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, path: str, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(self.url + path, timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False
        wait_for(ready, timeout=timeout, interval=0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # this PID only: the process we started
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def start_alertmanager(binary: str, workdir: Path, config: dict[str, Any]) -> Process:
    (workdir / "alertmanager.yml").write_text(json.dumps(config))
    (workdir / "am-data").mkdir()
    port = free_port()
    process = Process("alertmanager", [
        binary, "--config.file=alertmanager.yml", "--storage.path=am-data",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
        "--log.level=warn",
    ], workdir, port)
    process.wait_ready("/-/ready")
    return process


def start_prometheus(binary: str, workdir: Path, config: dict[str, Any], rules: str) -> Process:
    (workdir / "rules.yml").write_text(rules)
    (workdir / "prometheus.yml").write_text(json.dumps(config))
    (workdir / "prom-data").mkdir()
    port = free_port()
    process = Process("prometheus", [
        binary, "--config.file=prometheus.yml", "--storage.tsdb.path=prom-data",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ], workdir, port)
    process.wait_ready("/-/ready")
    return process


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def query(prometheus: Process, expr: str) -> list[dict[str, Any]]:
    """The instant-query result of ``expr`` now (an empty list when there is no data)."""
    data = get_json(f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result
