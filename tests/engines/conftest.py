from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .envs import require


# Module-scoped: each SGLang test module holds it while its tests run and releases it after, so
# a short disk can make room for vLLM.
@pytest.fixture(scope="module")
def sglang_env() -> Iterator[Path]:
    with require("sglang") as venv:
        yield venv
