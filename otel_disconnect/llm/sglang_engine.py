"""Token counts from SGLang's engine, inside SGLang's HTTP server process (the ``engine`` source).

SGLang's ``TokenizerManager`` (``sglang.srt.managers.tokenizer_manager``) runs in the HTTP server
process; the scheduler (through the detokenizer) sends it, per step, a batch output whose
``output_ids[i]`` are the token ids that step added to request ``rids[i]`` (a delta, whatever
the request asked for: streamed, or only the final answer). Four methods of it are wrapped:

- ``_init_req_state``: runs in the HTTP request's task (``generate_request`` →
  ``_init_req_state``), so ``current_state()`` is that request: each of its SGLang request ids
  (one, several for a batch or ``n > 1``) is tied to the request's token account, on SGLang's
  own ``ReqState`` (its lifetime is SGLang's: nothing to leak), and ``state.extras[ENGINE_KEY]``
  is set at once (the response and upstream parsers skip the body then).
- ``_handle_batch_output``: counts ``len(output_ids[i])`` per tied request, per batch (a dict
  lookup per output): exact with several tokens per step, and for non-streaming requests too.
  The last output of a request (``finished_reasons[i]`` set) ends it: aborted when its type is
  ``abort`` (the scheduler stopped it: the client left, or an error), else finished.
- ``abort_request``: SGLang asks its scheduler to abort (the client left: the stream was closed
  or ``is_disconnected()`` seen while waiting): the request is marked ``engine_abort``
  (outcome ``cancelled``; SGLang then answers a non-streaming request with a 400 error body,
  which would otherwise look like a real answer). The tokens the scheduler still produces until
  it stops count too.
- ``_handle_abort_req``: the scheduler's echo for a request aborted while still queued (it never
  ran: 0 tokens).

An aborted request is counted in ``otel_disconnect_llm_engine_aborted_requests_total`` and
``otel_disconnect_llm_engine_aborted_tokens_total`` (the tokens it had generated, up to the
scheduler's last output), by model (SGLang's ``served_model_name``) and phase, as for vLLM.
SGLang is never imported here: the class is patched when SGLang imports its module (a
post-import hook), or at once when it already has. Each wrapper keeps the original under
``_otel_disconnect_original``.
"""

from __future__ import annotations

import importlib.util
import types
from typing import Any

from ..context import current_state
from ..failsafe import internal_error
from ..state import STOPPED_ENGINE_ABORT, RequestState
from .account import ENGINE_KEY
from .import_hooks import PatchOnImport
from .vllm_engine import EngineMark, EngineRequest

TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager"
_MARK = "_otel_disconnect_original"
# On SGLang's ReqState: the EngineRequest tying it to an HTTP request (None once it ended).
_TIED = "_otel_disconnect_request"
# On a TokenizerManager: its result dispatcher calls the wrapped _handle_abort_req.
_REBOUND = "_otel_disconnect_rebound"
_WHERE = "sglang_engine"


def instrument_sglang_engine() -> bool:
    """Patch SGLang's tokenizer manager once per process, now or when SGLang is imported (never
    imported here); False when SGLang is not installed."""
    if importlib.util.find_spec("sglang") is None:
        return False
    _hooks.enable()
    return True


def _patch(mod: types.ModuleType) -> None:
    if mod.__name__ == TOKENIZER_MANAGER:
        _patch_tokenizer_manager(mod.TokenizerManager)


def _patch_tokenizer_manager(cls: Any) -> None:
    if hasattr(cls._handle_batch_output, _MARK):
        return
    original_init = cls._init_req_state
    original_output = cls._handle_batch_output
    original_abort = cls.abort_request
    original_echo = cls._handle_abort_req

    def _init_req_state(self: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_init(self, obj, *args, **kwargs)
        state = current_state()
        if state is not None:
            try:
                _tie(self, obj, state, original_echo)
            except Exception:
                internal_error(_WHERE)
        return result

    def _handle_batch_output(self: Any, recv_obj: Any, *args: Any, **kwargs: Any) -> Any:
        # SGLang's method is a coroutine function: calling it only creates the coroutine, which
        # its handle_loop awaits. The counting runs now, before SGLang drops finished states.
        try:
            _count_outputs(self.rid_to_state, recv_obj)
        except Exception:
            internal_error(_WHERE)
        return original_output(self, recv_obj, *args, **kwargs)

    def abort_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_abort(self, *args, **kwargs)
        try:
            rid = args[0] if args else kwargs.get("rid", "")
            abort_all = args[1] if len(args) > 1 else kwargs.get("abort_all", False)
            _note_abort(self.rid_to_state, rid, abort_all)
        except Exception:
            internal_error(_WHERE)
        return result

    def _handle_abort_req(self: Any, recv_obj: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            _end(self.rid_to_state.get(recv_obj.rid), aborted=True)
        except Exception:
            internal_error(_WHERE)
        return original_echo(self, recv_obj, *args, **kwargs)

    for wrapper, wrapped in (
        (_init_req_state, original_init),
        (_handle_batch_output, original_output),
        (abort_request, original_abort),
        (_handle_abort_req, original_echo),
    ):
        setattr(wrapper, _MARK, wrapped)
    cls._init_req_state = _init_req_state
    cls._handle_batch_output = _handle_batch_output
    cls.abort_request = abort_request
    cls._handle_abort_req = _handle_abort_req


def _tie(manager: Any, obj: Any, state: RequestState, original_echo: Any) -> None:
    """Tie the SGLang requests of ``obj`` (just given their ReqState) to the HTTP request."""
    if not manager.__dict__.get(_REBOUND):
        _rebind_echo(manager, original_echo)
    rids = obj.rid if getattr(obj, "is_single", True) is False else [obj.rid]
    states = manager.rid_to_state
    mark: EngineMark = state.extra(ENGINE_KEY, EngineMark)
    if mark.model is None:
        name = getattr(manager, "served_model_name", None)
        mark.model = str(name) if name else None
    for rid in rids:
        req_state = states.get(rid)
        if req_state is not None and getattr(req_state, _TIED, None) is None:
            setattr(req_state, _TIED, EngineRequest(state, mark.model))


def _rebind_echo(manager: Any, original_echo: Any) -> None:
    """A tokenizer manager built before the patch holds the original ``_handle_abort_req``,
    bound, in its result dispatcher: point that entry at the wrapped method (once)."""
    manager.__dict__[_REBOUND] = True
    dispatcher = getattr(manager, "_result_dispatcher", None)
    mapping = getattr(dispatcher, "_mapping", None)
    if not isinstance(mapping, dict):
        return
    wrapped = manager._handle_abort_req
    for kind, fn in list(mapping.items()):
        if getattr(fn, "__func__", None) is original_echo and getattr(fn, "__self__", None) is (
            manager
        ):
            mapping[kind] = wrapped
            cache = getattr(dispatcher, "_mro_cache", None)
            if isinstance(cache, dict):
                cache.clear()


def _count_outputs(states: Any, recv_obj: Any) -> None:
    """Count the token ids of each output of a batch tied to a request."""
    rids = recv_obj.rids
    if not rids:
        return
    ids = getattr(recv_obj, "output_ids", None)  # an embedding batch has none
    reasons = recv_obj.finished_reasons
    for i, rid in enumerate(rids):
        req_state = states.get(rid)
        if req_state is None:
            continue
        found: EngineRequest | None = getattr(req_state, _TIED, None)
        if found is None:
            continue
        if ids is not None:
            n = len(ids[i])
            state = found.state
            if state.detected_perf is None and not state.ended:
                found.segment.counted += n  # the hot path: nothing to split yet, no lock
            else:
                found.counted(n)
        reason = reasons[i]
        if reason is not None:
            _end(req_state, aborted=isinstance(reason, dict) and reason.get("type") == "abort")


def _end(req_state: Any, aborted: bool) -> None:
    found: EngineRequest | None = getattr(req_state, _TIED, None)
    if found is None:
        return
    setattr(req_state, _TIED, None)
    if aborted:
        found.aborted()
    else:
        found.finished()


def _note_abort(states: Any, rid: Any, abort_all: bool) -> None:
    """SGLang asked its scheduler to abort ``rid``, or all: the tied requests' work stops. (The
    scheduler also aborts the requests whose id starts with ``rid``; their last output says so,
    and their clients, if any, are still there.)"""
    found: EngineRequest | None
    if abort_all:
        for req_state in list(states.values()):
            found = getattr(req_state, _TIED, None)
            if found is not None:
                found.state.note_work_stopped(STOPPED_ENGINE_ABORT)
        return
    found = getattr(states.get(rid), _TIED, None) if rid else None
    if found is not None:
        found.state.note_work_stopped(STOPPED_ENGINE_ABORT)


_hooks = PatchOnImport((TOKENIZER_MANAGER,), _patch, _WHERE)
