"""Cached virtual environments with the real vLLM and LiteLLM, for the engine tests.

Each lives under ``.matrix/`` and is keyed by a digest of its Python and pins (not of
pyproject.toml: the project is installed editable, so a code change needs no rebuild, and a
10 GB vLLM environment is rebuilt only when its pins change). Built on first use; a failed build
leaves no ``ready`` marker and its pip output in ``build.log``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"

# name: (python, pins). vLLM 0.33.0 pins torch==2.14.0 (a CUDA build from PyPI, several GB; the
# tests use no model, so no GPU) and wants Python >= 3.11. vLLM 0.13.0 (the oldest the tests
# drive) pins torch==2.9.0 and wants Python 3.10 to 3.13: about 11 GB, 5 minutes to build here.
ENVS: dict[str, tuple[str, list[str]]] = {
    "vllm0.33": ("3.11", ["vllm==0.33.0"]),
    "vllm0.13": ("3.11", ["vllm==0.13.0"]),
    # The newest litellm[proxy] that resolves here: 1.110 needs litellm-proxy, 1.108.8 to 1.109
    # a litellm-enterprise or litellm-proxy-extras release that the index does not have.
    "litellm": (
        "3.11",
        [
            "litellm[proxy]==1.108.7",
            "opentelemetry-distro",
            "opentelemetry-instrumentation-fastapi",
        ],
    ),
    "sglang": ("3.11", ["sglang==0.5.23"]),
}


def python_for(version: str) -> str | None:
    if sys.version_info[:2] == tuple(int(p) for p in version.split(".")):
        return sys.executable
    candidates = sorted(PYENV.glob(f"{version}.*/bin/python"), reverse=True)
    found = [str(c) for c in candidates] + [shutil.which(f"python{version}") or ""]
    return next((f for f in found if f), None)


def env_dir(name: str) -> Path:
    version, pins = ENVS[name]
    digest = hashlib.sha256("\n".join([version, *pins]).encode()).hexdigest()[:12]
    return ROOT / ".matrix" / f"{name}-{digest}"


def build(name: str) -> Path:
    """The environment's directory, built if needed; raises with pip's output when it cannot."""
    version, pins = ENVS[name]
    venv = env_dir(name)
    if (venv / "ready").exists():
        return venv
    python = python_for(version)
    if python is None:
        raise RuntimeError(f"Python {version} is not installed (pyenv provides it)")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    log = venv / "build.log"
    with log.open("w") as out:
        steps = [[*pip, "--upgrade", "pip"], [*pip, *pins], [*pip, "-e", str(ROOT)]]
        for step in steps:
            out.write("$ " + " ".join(step) + "\n")
            out.flush()
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = log.read_text()[-4000:]
                raise RuntimeError(f"building {venv.name} failed ({' '.join(step)}):\n{tail}")
    (venv / "ready").write_text("ok\n")
    return venv


def require(name: str) -> Path:
    """Build (once) or skip; under CI=true a failed build fails the test."""
    try:
        return build(name)
    except RuntimeError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


if __name__ == "__main__":  # python -m tests.engines.envs NAME: build ahead of the tests
    for arg in sys.argv[1:]:
        print(build(arg))
