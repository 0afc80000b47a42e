"""The database tests again on SQLAlchemy 2.0, in a venv of their own (tests/venvs.py).

The dev venv has the newest SQLAlchemy (2.1); the package supports 2.0 too
(README: Supported and tested). The venv is
rebuilt when pyproject.toml changes; the inner run reuses this session's PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..venvs import MATRIX, ROOT, BuildError, pip_steps

REQUIREMENT = "SQLAlchemy[asyncio]>=2.0,<2.1"
INSTALL = [
    "-e",
    f"{ROOT}[demo]",
    REQUIREMENT,
    "pytest>=8",
    "pytest-timeout>=2.3",
    "pytest-asyncio>=0.23",
    "aiosqlite>=0.20",
]

pytestmark = pytest.mark.matrix


@pytest.mark.timeout(1800)
def test_database_tests_pass_on_sqlalchemy_20(pg_url: str) -> None:
    if os.environ.get("OTEL_DISCONNECT_INNER_MATRIX"):
        pytest.skip("already inside the SQLAlchemy 2.0 run")
    # Keyed by pyproject.toml too: the package's own requirements come from it.
    key = (ROOT / "pyproject.toml").read_text() + "\n".join(INSTALL)
    steps = pip_steps(sys.executable, [INSTALL])
    try:
        with MATRIX.using("sqlalchemy20", key, steps, need_gb=1) as venv:
            _run(venv / "bin" / "python", pg_url)
    except BuildError as exc:
        pytest.fail(str(exc))


def _run(python: Path, pg_url: str) -> None:
    version = subprocess.run(
        [str(python), "-c", "import sqlalchemy; print(sqlalchemy.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert version.startswith("2.0."), version
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/db",
         "--deselect", "tests/db/test_sqlalchemy20.py"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OTEL_DISCONNECT_TEST_DATABASE_URL": pg_url,
             "OTEL_DISCONNECT_INNER_MATRIX": "1"},
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"SQLAlchemy {version}:\n{output}"
    assert " passed" in result.stdout
