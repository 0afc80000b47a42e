"""The benchmark still runs end to end, and the request path leaves no reference cycles behind.

The smoke run uses the Python load generator so it runs everywhere (wrk is optional); its figures
are not checked, only that every variant was measured and every disconnect was detected.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_overhead_quick_run(tmp_path: Path) -> None:
    output = tmp_path / "results.md"
    run = subprocess.run(
        [sys.executable, str(BENCH / "overhead.py"), "--quick", "--loadgen", "python",
         "--output", str(output)],
        check=False, capture_output=True, text=True, timeout=180,
        env=dict(os.environ, PYTHONWARNINGS="error"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = output.read_text()
    for route in ("/hello", "/stream"):
        for variant in ("bare", "otel", "otel+disconnect", "otel+naive"):
            row = re.search(rf"^\| `{route}` \| {re.escape(variant)} \| ([\d.]+) ", text, re.M)
            assert row is not None, f"no row for {variant} {route}:\n{text}"
            assert float(row.group(1)) > 0
    detection = re.search(r"^\| uvicorn-httptools \| 5 \| ([\d.]+) \| ([\d.]+) \|", text, re.M)
    assert detection is not None, text
    assert 0 <= float(detection.group(1)) <= float(detection.group(2))


@pytest.fixture
def micro() -> Iterator[Any]:
    sys.path.insert(0, str(BENCH))
    try:
        import micro

        yield micro
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("path", ["/hello", "/stream"])
def test_no_reference_cycles_per_request(micro: Any, path: str) -> None:
    """No added p99 tail (README: Performance), so no reference cycles per request (the
    OpenTelemetry-only app is the baseline: whatever it leaves, the middleware must not add to)."""
    baseline = micro.garbage_per_request(micro.create_app("otel"), path)
    with_middleware = micro.garbage_per_request(micro.create_app("otel+disconnect"), path)
    assert with_middleware <= baseline, (
        f"otel-disconnect adds {with_middleware - baseline:.1f} cyclic garbage objects per request"
    )
