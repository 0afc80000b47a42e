"""The database tests again on SQLAlchemy 2.0, in a venv of their own (cached under .matrix/).

The dev venv has the newest SQLAlchemy (2.1); SPEC section 11 also supports 2.0. The venv is
rebuilt when pyproject.toml changes; the inner run reuses this session's PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".matrix" / "sqlalchemy20"
REQUIREMENT = "SQLAlchemy[asyncio]>=2.0,<2.1"

pytestmark = pytest.mark.matrix


def _python() -> Path:
    return VENV / "bin" / "python"


def _build() -> None:
    recipe = (ROOT / "pyproject.toml").read_bytes() + REQUIREMENT.encode()
    stamp = hashlib.sha256(recipe).hexdigest()
    marker = VENV / ".stamp"
    if marker.exists() and marker.read_text() == stamp:
        return
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run(
        [str(_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-e", f"{ROOT}[demo]", REQUIREMENT, "pytest>=8", "pytest-timeout>=2.3",
         "pytest-asyncio>=0.23", "aiosqlite>=0.20"],
        check=True, timeout=900,
    )
    marker.write_text(stamp)


@pytest.mark.timeout(1800)
def test_database_tests_pass_on_sqlalchemy_20(pg_url: str) -> None:
    if os.environ.get("OTEL_DISCONNECT_INNER_MATRIX"):
        pytest.skip("already inside the SQLAlchemy 2.0 run")
    _build()
    version = subprocess.run(
        [str(_python()), "-c", "import sqlalchemy; print(sqlalchemy.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert version.startswith("2.0."), version
    result = subprocess.run(
        [str(_python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/db",
         "--deselect", "tests/db/test_sqlalchemy20.py"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OTEL_DISCONNECT_TEST_DATABASE_URL": pg_url,
             "OTEL_DISCONNECT_INNER_MATRIX": "1"},
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"SQLAlchemy {version}:\n{output}"
    assert " passed" in result.stdout
