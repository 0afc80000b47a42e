"""The OutputProcessor wrappers on stand-ins with vLLM's method names: the wrapper with vLLM
0.33's exact parameters where the method has them, the ``*args, **kwargs`` one elsewhere, and
both count, pass every argument on and end requests alike."""

from __future__ import annotations

import types
from typing import Any

import pytest

from otel_disconnect.context import reset_current, set_current
from otel_disconnect.llm import vllm_engine
from otel_disconnect.llm.account import ENGINE, account_for
from otel_disconnect.state import RequestState


class _Output:
    def __init__(self, request_id: str, tokens: int, finish: Any = None) -> None:
        self.request_id = request_id
        self.new_token_ids = list(range(tokens))
        self.finish_reason = finish


class _V033:
    def add_request(self, request: Any, prompt: Any, parent_req: Any = None,
                    request_index: int = 0, queue: Any = None) -> None:
        return None

    def process_outputs(self, engine_core_outputs: Any, engine_core_timestamp: Any = None,
                        iteration_stats: Any = None, weight_version: Any = None) -> Any:
        return (len(engine_core_outputs), engine_core_timestamp, iteration_stats, weight_version)

    def abort_requests(self, request_ids: Any, internal: bool) -> list[str]:
        return list(request_ids)


class _Older(_V033):
    def process_outputs(  # type: ignore[override]
        self, engine_core_outputs: Any, engine_core_timestamp: Any = None,
        iteration_stats: Any = None,
    ) -> Any:
        return (len(engine_core_outputs), engine_core_timestamp, iteration_stats)


@pytest.mark.parametrize(("cls", "fast"), [(_V033, True), (_Older, False)])
def test_outputs_are_counted_and_calls_passed_on(cls: type, fast: bool) -> None:
    stand_in = type(cls.__name__, (cls,), {})
    vllm_engine._patch_output_processor(stand_in)
    assert vllm_engine._has_signature(stand_in.process_outputs._otel_disconnect_original) is fast
    processor = stand_in()
    state = RequestState({"type": "http", "method": "POST", "path": "/v1/chat/completions"})
    token = set_current(state)
    try:
        processor.add_request(types.SimpleNamespace(request_id="r1"), None)
    finally:
        reset_current(token)
    try:
        assert processor.process_outputs([_Output("r1", 2)]) == (1, None, None, *[None] * fast)
        if fast:
            assert processor.process_outputs([_Output("r1", 3)], 1.5, "stats",
                                             weight_version="w") == (1, 1.5, "stats", "w")
        else:
            assert processor.process_outputs([_Output("r1", 3)], 1.5, iteration_stats="stats") \
                == (1, 1.5, "stats")
        processor.process_outputs([_Output("other", 7), _Output("r1", 1, finish="stop")])
        assert "r1" not in vllm_engine._live
        total, _, _, _ = account_for(state).tallies[ENGINE].split(None)
        assert total == 6
    finally:
        vllm_engine._live.pop("r1", None)
