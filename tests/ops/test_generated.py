"""The committed dashboards, rules and provisioning files are exactly what the code generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from otel_disconnect.tools.cli import main as cli_main
from otel_disconnect.tools.ops import generate, provisioning, yaml_out
from otel_disconnect.tools.ops.alerts import rules_document

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", sorted(generate.repository_files()))
def test_committed_file_equals_generated(rel: str) -> None:
    path = ROOT / rel
    assert path.is_file(), f"{rel} missing: run otel-disconnect generate"
    assert path.read_text(encoding="utf-8") == generate.repository_files()[rel], (
        f"{rel} differs from the generated file: run otel-disconnect generate"
    )


def test_every_dashboard_and_rule_file_in_the_repo_is_generated() -> None:
    generated = set(generate.repository_files())
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "dashboards").glob("*.json")}
    on_disk |= {str(p.relative_to(ROOT)) for p in (ROOT / "alerts").glob("*.yml")}
    assert on_disk <= generated, f"stale files nobody generates: {sorted(on_disk - generated)}"


def test_regenerate_command_writes_an_identical_tree(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    assert cli_main(["generate", str(tmp_path)]) == 0
    for rel, text in generate.repository_files().items():
        assert (tmp_path / rel).read_text(encoding="utf-8") == text
    # A second run finds nothing to change.
    assert generate.write(tmp_path) == []


@pytest.mark.parametrize("document", [
    rules_document(), rules_document("3s"), provisioning.datasources(),
    provisioning.dashboard_providers(),
    {"odd": ["yes", "no", "on", "null", "10", "1.5", "a: b", "x #y", "", " lead", "-", "é"],
     "nested": [[1, 2], {}, [], {"k": [True, None, 2.5]}], "multi": "a\n  b\nc\n"},
])
def test_yaml_writer_round_trips(document: dict[str, object]) -> None:
    assert yaml.safe_load(yaml_out.dump(document, "header")) == document


def test_for_override_changes_only_for() -> None:
    shipped = rules_document()["groups"][0]["rules"]
    short = rules_document("2s")["groups"][0]["rules"]
    assert [r["for"] for r in short] == ["2s"] * len(shipped)
    assert [{**r, "for": None} for r in short] == [{**r, "for": None} for r in shipped]
