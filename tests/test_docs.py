"""The repository's reference (docs/) names every span attribute, event and metric the code
declares, and the code points there rather than to documents users never see."""

from __future__ import annotations

import re
from pathlib import Path

from otel_disconnect.telemetry import spans
from otel_disconnect.telemetry.catalog import FLEET_METRICS, METRICS

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")


def test_every_span_attribute_and_event_is_in_the_reference() -> None:
    names = [
        value
        for key, value in vars(spans).items()
        if key.isupper() and isinstance(value, str) and "." in value
    ]
    assert len(names) > 20
    missing = [name for name in names if f"`{name}`" not in REFERENCE]
    assert not missing, f"docs/reference.md does not name {missing}"


def test_every_metric_is_in_the_reference() -> None:
    def exposed(spec_name: str, kind: str) -> str:
        return spec_name + "_total" if kind == "counter" else spec_name

    names = [exposed(spec.name, spec.kind) for spec in METRICS + FLEET_METRICS]
    source = (ROOT / "otel_disconnect" / "db" / "pg_activity.py").read_text(encoding="utf-8")
    names += ["otel_disconnect_" + n for n in re.findall(r'PREFIX \+ "(pg_\w+)"', source)]
    assert any("pg_" in n for n in names)
    missing = [name for name in names if f"`{name}`" not in REFERENCE]
    assert not missing, f"docs/reference.md does not name {missing}"


def test_the_code_cites_no_spec_section() -> None:
    cited = [
        str(path.relative_to(ROOT))
        for top in ("otel_disconnect", "tests", "bench")
        for path in (ROOT / top).rglob("*.py")
        if re.search(r"\bSPEC\b", path.read_text(encoding="utf-8"))
    ]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if re.search(r"\bSPEC\b", readme):
        cited.append("README.md")
    assert not cited, f"point these to docs/ or the README instead: {cited}"
