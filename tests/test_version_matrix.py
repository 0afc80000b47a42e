"""The detection suite (tests marked ``matrix``) on the versions of SPEC section 11.

Each combination gets its own virtual environment under ``.matrix/`` (kept between runs, rebuilt
when the pins or pyproject.toml change) and runs ``pytest -m matrix`` there. The main environment
is the newest releases on the default Python.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"

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


def _python(version: str) -> str | None:
    if sys.version_info[:2] == tuple(int(p) for p in version.split(".")):
        return sys.executable
    candidates = sorted(PYENV.glob(f"{version}.*/bin/python"), reverse=True)
    found = [str(c) for c in candidates] + [shutil.which(f"python{version}") or ""]
    return next((f for f in found if f), None)


def _venv(name: str, python: str, pins: list[str]) -> Path:
    digest = hashlib.sha256(
        ("\n".join([python, *pins]) + (ROOT / "pyproject.toml").read_text()).encode()
    ).hexdigest()[:12]
    venv = ROOT / ".matrix" / f"{name}-{digest}"
    marker = venv / "ready"
    if marker.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, capture_output=True)
    result = subprocess.run([*pip, "-e", f"{ROOT}[dev]", *pins], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    marker.write_text("ok\n")
    return venv


# The detection, transparency and cancellation suites: the behaviour that differs by server,
# framework and Python version.
SUITES = ["tests/test_detection.py", "tests/test_transparency.py", "tests/test_cancellation.py"]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_detection_suite_on_supported_versions(name: str) -> None:
    version, pins = COMBINATIONS[name]
    python = _python(version)
    if python is None:
        if IN_CI:
            pytest.fail(f"Python {version} is required in CI (pyenv provides it)")
        pytest.skip(f"Python {version} not installed")
    venv = _venv(name, python, pins)
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
