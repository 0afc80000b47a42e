"""The detection suite (tests marked ``matrix``) on the versions the README lists
under Supported and tested.

Each combination gets its own virtual environment under ``.matrix/`` (``tests/venvs.py``: kept
between runs, rebuilt when the pins or pyproject.toml change) and runs ``pytest -m matrix``
there. The main environment is the newest releases on the default Python.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import IN_CI
from .venvs import MATRIX, ROOT, BuildError, pip_steps, python_for

COMBINATIONS = {
    # name: (python, pins)
    "py310-uvicorn0.40-starlette0.50-fastapi0.128": (
        "3.10",
        ["uvicorn[standard]==0.40.0", "starlette==0.50.0", "fastapi==0.128.0"],
    ),
    "py311-uvicorn0.32-starlette0.50": (
        "3.11",
        ["uvicorn[standard]==0.32.0", "starlette==0.50.0", "fastapi==0.128.0"],
    ),
    "py313-newest": ("3.13", []),
}


def _steps(python: str, pins: list[str]) -> list[list[str]]:
    return pip_steps(python, [["-e", f"{ROOT}[dev]", *pins]])


# Each is some 300 MB (uvicorn, Starlette, FastAPI, OpenTelemetry and the test tools).
NEED_GB = 1.5


# The detection, transparency and cancellation suites: the behaviour that differs by server,
# framework and Python version.
SUITES = ["tests/test_detection.py", "tests/test_transparency.py", "tests/test_cancellation.py"]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_detection_suite_on_supported_versions(name: str) -> None:
    version, pins = COMBINATIONS[name]
    python = python_for(version)
    if python is None:
        if IN_CI:
            pytest.fail(f"Python {version} is required in CI (pyenv provides it)")
        pytest.skip(f"Python {version} not installed")
    # Keyed by pyproject.toml too: the test tools come from the project's dev extra.
    key = "\n".join([python, *pins]) + (ROOT / "pyproject.toml").read_text()
    try:
        with MATRIX.using(name, key, _steps(python, pins), need_gb=NEED_GB) as venv:
            _run_suites(name, venv, pins)
    except BuildError as exc:
        pytest.fail(str(exc))


def _run_suites(name: str, venv: Path, pins: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    result = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pytest",
            *SUITES,
            "-m",
            "matrix",
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    versions = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys, uvicorn, starlette, fastapi; "
            "print(sys.version.split()[0], uvicorn.__version__, starlette.__version__, "
            "fastapi.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"{name} ({versions}):\n{tail}"
    assert " passed" in result.stdout and "failed" not in result.stdout, tail
    for pin in pins:
        _package, version_pin = pin.split("==")
        assert version_pin in versions, (pin, versions)
