"""The real vLLM, SGLang and LiteLLM, each in a cached environment (``tests/venvs.py``).

Each is keyed by a digest of its Python and pins (not of pyproject.toml: the project is installed
editable, so a code change needs no rebuild, and a 10 GB vLLM environment is rebuilt only when
its pins change).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

from ..conftest import IN_CI
from ..venvs import MATRIX, ROOT, BuildError, pip_steps, python_for


class Spec(NamedTuple):
    python: str
    pins: list[str]
    # The disk a build takes at its peak (the environment, and pip's downloads held until the
    # install ends), sampled with `df` every second while building here, rounded up, plus 1 GB.
    # The environment itself is a little smaller afterwards (its size in the comment).
    need_gb: float


# vLLM 0.33.0 pins torch==2.14.0 (a CUDA build from PyPI, several GB; the tests use no model, so
# no GPU) and wants Python >= 3.11. vLLM 0.13.0 (the oldest the tests drive) pins torch==2.9.0
# and wants Python 3.10 to 3.13. SGLang 0.5.23 takes torch 2.14.1, which pip finds on this disk.
ENVS: dict[str, Spec] = {
    "vllm0.33": Spec("3.11", ["vllm==0.33.0"], need_gb=13),  # peak 12.0 GB, then 9.6 GB
    "vllm0.13": Spec("3.11", ["vllm==0.13.0"], need_gb=17),  # peak 15.1 GB, then 10.3 GB
    # The newest litellm[proxy] that resolves here: 1.110 needs litellm-proxy, 1.108.8 to 1.109
    # a litellm-enterprise or litellm-proxy-extras release that the index does not have.
    "litellm": Spec(
        "3.11",
        [
            "litellm[proxy]==1.108.7",
            "opentelemetry-distro",
            "opentelemetry-instrumentation-fastapi",
        ],
        need_gb=2,  # peak 0.9 GB, then 0.8 GB
    ),
    "sglang": Spec("3.11", ["sglang==0.5.23"], need_gb=13),  # peak 12.0 GB, then 10.5 GB
}


@contextmanager
def using(name: str) -> Iterator[Path]:
    """The environment's directory, built if needed; raises BuildError when it cannot be."""
    spec = ENVS[name]
    python = python_for(spec.python)
    if python is None:
        raise BuildError(f"Python {spec.python} is not installed (pyenv provides it)")
    steps = pip_steps(python, [spec.pins, ["-e", str(ROOT)]])
    key = "\n".join([spec.python, *spec.pins])
    with MATRIX.using(name, key, steps, need_gb=spec.need_gb) as venv:
        yield venv


@contextmanager
def require(name: str) -> Iterator[Path]:
    """For a fixture (``with require(name) as venv: yield ...``): the environment, held while the
    fixture lives; skip, or under CI=true fail, when it cannot be built."""
    try:
        with using(name) as venv:
            yield venv
    except BuildError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


if __name__ == "__main__":  # python -m tests.engines.envs NAME...: build ahead of the tests
    for arg in sys.argv[1:]:
        with using(arg) as built:
            print(built)
