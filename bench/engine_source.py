"""Instructions the vLLM engine token source adds per engine output, counted by callgrind.

The wrappers measured are the real ones (``otel_disconnect.llm.vllm_engine``), installed on a
stand-in class with the method names, signatures (vLLM 0.33's) and call shapes of vLLM's
``OutputProcessor``, whose own
methods do nothing: vLLM is not imported (its import alone is billions of instructions under
valgrind), and what vLLM itself does per output is the same with and without the package. One
request is tied to an HTTP request's state, and each engine output carries 2 token ids.

Two runs each of ``bare`` and ``patched``, ``N1`` and ``N2`` outputs after the same set-up; the
per-output cost is ((patched N2 - patched N1) - (bare N2 - bare N1)) / (N2 - N1).

Usage: ``python bench/engine_source.py``.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

N1, N2 = 1_000, 6_000


class OutputProcessor:
    """The stand-in: vLLM's method names and signatures, no work."""

    def add_request(
        self,
        request: Any,
        prompt: Any,
        parent_req: Any = None,
        request_index: int = 0,
        queue: Any = None,
    ) -> None:
        return None

    def process_outputs(
        self,
        engine_core_outputs: Any,
        engine_core_timestamp: Any = None,
        iteration_stats: Any = None,
        weight_version: Any = None,
    ) -> None:
        return None

    def abort_requests(self, request_ids: Any, internal: bool) -> list[str]:
        return list(request_ids)


class EngineCoreOutput:
    __slots__ = ("finish_reason", "new_token_ids", "request_id")

    def __init__(self, request_id: str, new_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.new_token_ids = new_token_ids
        self.finish_reason = None


class Request:
    request_id = "req-1"


def _drive(variant: str, n: int) -> None:
    from otel_disconnect.context import reset_current, set_current
    from otel_disconnect.llm import vllm_engine
    from otel_disconnect.state import RequestState

    if variant == "patched":
        vllm_engine._patch_output_processor(OutputProcessor)
    processor = OutputProcessor()
    state = RequestState({"type": "http", "method": "POST", "path": "/v1/chat/completions"})
    token = set_current(state)
    processor.add_request(Request(), None, None, 0, None)
    reset_current(token)
    batches = [[EngineCoreOutput("req-1", [1, 2])] for _ in range(n)]
    gc.collect()
    gc.disable()
    for batch in batches:
        # As vLLM 0.33's AsyncLLM output handler calls it.
        processor.process_outputs(batch, 1.0, None, weight_version=None)
    if variant == "patched":
        assert vllm_engine._live["req-1"].segment.counted == 2 * n


def _count(variant: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                __file__,
                "--drive",
                variant,
                str(n),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    match = re.search(r"Collected : (\d+)", result.stderr)
    assert match, result.stderr[-2000:]
    return int(match.group(1))


def main() -> None:
    if sys.argv[1:2] == ["--drive"]:
        _drive(sys.argv[2], int(sys.argv[3]))
        return
    runs = [(v, n) for v in ("bare", "patched") for n in (N1, N2)]
    with ThreadPoolExecutor(len(runs)) as pool:  # four processes under valgrind at once
        totals = dict(zip(runs, pool.map(lambda run: _count(*run), runs), strict=True))
    cost = {v: (totals[v, N2] - totals[v, N1]) / (N2 - N1) for v in ("bare", "patched")}
    print(
        f"instructions per engine output: bare {cost['bare']:,.0f}, "
        f"patched {cost['patched']:,.0f}, added {cost['patched'] - cost['bare']:,.0f}"
    )


if __name__ == "__main__":
    main()
