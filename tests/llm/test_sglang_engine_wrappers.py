"""The TokenizerManager wrappers on a stand-in with SGLang 0.5.23's method names and call shape
(``_init_req_state`` in the request's task, ``_handle_batch_output`` a coroutine function over
batches of ``rids`` / ``output_ids`` deltas / ``finished_reasons``, ``abort_request``, the
queued-abort echo ``_handle_abort_req`` reached through a dispatcher bound at construction).
SGLang itself runs in tests/engines/test_sglang.py."""

from __future__ import annotations

import asyncio
import dataclasses
import types
from typing import Any

from prometheus_client import REGISTRY

from otel_disconnect.context import reset_current, set_current
from otel_disconnect.llm import sglang_engine
from otel_disconnect.llm.account import ENGINE, ENGINE_KEY, account_for
from otel_disconnect.state import STOPPED_ENGINE_ABORT, RequestState

MODEL = "stand-in-sglang"


@dataclasses.dataclass
class _ReqState:  # SGLang's ReqState is a plain dataclass too
    obj: Any
    finished: bool = False


@dataclasses.dataclass
class _Batch:  # BatchStrOutput's fields that the wrapper reads
    rids: list[str]
    output_ids: list[list[int]] | None
    finished_reasons: list[Any]


@dataclasses.dataclass
class _AbortReq:
    rid: str


class _Dispatcher:  # as sglang.utils.TypeBasedDispatcher
    def __init__(self, mapping: list[tuple[type, Any]]) -> None:
        self._mapping = dict(mapping)
        self._mro_cache: dict[type, Any] = {}

    def __call__(self, obj: Any) -> Any:
        return self._mapping[type(obj)](obj)


class _TokenizerManager:
    def __init__(self) -> None:
        self.served_model_name = MODEL
        self.rid_to_state: dict[str, _ReqState] = {}
        self.sent: list[Any] = []
        self._result_dispatcher = _Dispatcher([(_AbortReq, self._handle_abort_req)])

    def _init_req_state(self, obj: Any, request: Any = None) -> None:
        rids = [obj.rid] if obj.is_single else obj.rid
        for rid in rids:
            self.rid_to_state[rid] = _ReqState(obj)

    async def _handle_batch_output(self, recv_obj: Any) -> int:
        for i, rid in enumerate(recv_obj.rids):
            if recv_obj.finished_reasons[i] is not None:
                self.rid_to_state.pop(rid, None)
        return len(recv_obj.rids)

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.sent.append((rid, abort_all))

    def _handle_abort_req(self, recv_obj: Any) -> None:
        self.rid_to_state.pop(recv_obj.rid, None)


def _patched() -> type:
    cls = type("TokenizerManager", (_TokenizerManager,), {})
    sglang_engine._patch_tokenizer_manager(cls)
    return cls


def _request() -> RequestState:
    return RequestState({"type": "http", "method": "POST", "path": "/generate"})


def _start(manager: Any, state: RequestState, rid: Any, single: bool = True) -> None:
    token = set_current(state)
    try:
        manager._init_req_state(types.SimpleNamespace(rid=rid, is_single=single))
    finally:
        reset_current(token)


def _step(manager: Any, *outputs: tuple[str, int, Any]) -> Any:
    batch = _Batch([o[0] for o in outputs], [list(range(o[1])) for o in outputs],
                   [o[2] for o in outputs])
    return asyncio.run(manager._handle_batch_output(batch))


def _total(state: RequestState) -> int:
    total, _, _, _ = account_for(state).tallies[ENGINE].split(state.detected_perf)
    return total


def _aborted(phase: str, kind: str = "requests") -> float:
    name = f"otel_disconnect_llm_engine_aborted_{kind}_total"
    return REGISTRY.get_sample_value(name, {"model": MODEL, "phase": phase}) or 0.0


def test_token_ids_of_every_output_counted_exactly_and_calls_passed_on() -> None:
    manager = _patched()()
    state = _request()
    _start(manager, state, "r1")
    assert ENGINE_KEY in (state.extras or {})  # the body parsers stand aside
    assert _step(manager, ("r1", 2, None), ("untied", 5, None)) == 2  # the coroutine's result
    _step(manager, ("r1", 3, None))
    _step(manager, ("r1", 1, {"type": "length", "length": 6}))
    assert _total(state) == 6
    assert "r1" not in manager.rid_to_state
    assert account_for(state).model == MODEL


def test_a_batch_request_ties_each_of_its_ids() -> None:
    manager = _patched()()
    state = _request()
    _start(manager, state, ["a", "b"], single=False)
    _step(manager, ("a", 2, None), ("b", 4, {"type": "stop"}))
    _step(manager, ("a", 1, {"type": "stop"}))
    assert _total(state) == 7


def test_abort_of_a_running_request_counts_its_tokens_until_the_scheduler_stops() -> None:
    manager = _patched()()
    state = _request()
    _start(manager, state, "run")
    _step(manager, ("run", 2, None))
    state.mark_disconnected("receive")
    before = (_aborted("before_response"), _aborted("before_response", "tokens"))
    manager.abort_request("run")
    assert manager.sent == [("run", False)]
    assert state.work_stopped == STOPPED_ENGINE_ABORT  # outcome cancelled, whatever SGLang sends
    _step(manager, ("run", 2, {"type": "abort", "message": "Abort before decoding"}))
    assert _total(state) == 4
    assert _aborted("before_response") - before[0] == 1
    assert _aborted("before_response", "tokens") - before[1] == 4


def test_abort_while_queued_counts_zero_through_the_dispatcher_bound_before_the_patch() -> None:
    manager = _TokenizerManager()  # built unpatched: its dispatcher holds the original echo
    cls = type(manager)
    originals = {k: cls.__dict__[k] for k in
                 ("_init_req_state", "_handle_batch_output", "abort_request", "_handle_abort_req")}
    try:
        sglang_engine._patch_tokenizer_manager(cls)
        state = _request()
        _start(manager, state, "queued")
        state.mark_disconnected("receive")
        before = (_aborted("before_response"), _aborted("before_response", "tokens"))
        manager.abort_request(rid="queued")
        manager._result_dispatcher(_AbortReq("queued"))  # the scheduler's echo
        assert _aborted("before_response") - before[0] == 1
        assert _aborted("before_response", "tokens") == before[1]
        assert not account_for(state).tallies[ENGINE].has_tokens()
        assert "queued" not in manager.rid_to_state
    finally:
        for name, original in originals.items():
            setattr(cls, name, original)


def test_outside_a_request_nothing_is_tied() -> None:
    manager = _patched()()
    manager._init_req_state(types.SimpleNamespace(rid="offline", is_single=True))
    _step(manager, ("offline", 3, {"type": "stop"}))
    manager.abort_request(abort_all=True)
    assert manager.sent == [("", True)]


def test_patched_once_on_import_of_the_tokenizer_manager_module() -> None:
    cls = type("TokenizerManager", (_TokenizerManager,), {})
    mod = types.ModuleType(sglang_engine.TOKENIZER_MANAGER)
    mod.TokenizerManager = cls  # type: ignore[attr-defined]
    sglang_engine._patch(mod)
    first = cls._handle_batch_output
    sglang_engine._patch(mod)
    assert cls._handle_batch_output is first
    assert first._otel_disconnect_original is _TokenizerManager._handle_batch_output
