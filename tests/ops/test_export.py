"""``otel-disconnect export DIR`` writes the files shipped in the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from otel_disconnect.tools.cli import main
from otel_disconnect.tools.ops import generate


def test_export_writes_dashboards_rules_and_provisioning(tmp_path: Path, capsys: object) -> None:
    assert main(["export", str(tmp_path / "out")]) == 0
    written = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")
               if p.is_file()}
    assert written == set(generate.bundle())
    for rel, text in generate.bundle().items():
        assert (tmp_path / "out" / rel).read_text(encoding="utf-8") == text


def test_export_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert main(["export", str(tmp_path)]) == 0
    target = tmp_path / "dashboards" / "otel-disconnect-overview.json"
    target.write_text("mine")
    assert main(["export", str(tmp_path)]) == 1
    assert target.read_text() == "mine"
    assert main(["export", "--force", str(tmp_path)]) == 0
    assert target.read_text() != "mine"


def test_export_through_the_console_entry_point(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "otel_disconnect", "export", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "alerts" / "otel-disconnect.rules.yml").is_file()
    assert "otel-disconnect.rules.yml" in done.stdout
