"""Token counts from vLLM's engine, inside vLLM's API server process (the ``engine`` source).

vLLM's ``OutputProcessor`` (``vllm.v1.engine.output_processor``) turns every engine step into
``RequestOutput``s: each ``EngineCoreOutput`` it processes carries the step's ``new_token_ids``
for one request, whatever the request asked for (streamed deltas, or only the final output of a
non-streaming request). Three methods of it are wrapped:

- ``add_request``: runs in the HTTP request's task (``AsyncLLM.generate`` → ``add_request``), so
  ``current_state()`` is that request: its engine request id is tied to the request's token
  account and ``state.extras[ENGINE_KEY]`` is set at once (the response and upstream parsers skip
  the body then: the engine's count is exact, theirs would be a second, worse one).
- ``process_outputs``: counts ``len(new_token_ids)`` per tied request, per step (a dict lookup and
  a ``len`` per engine output): exact with several tokens per step (speculative decoding, merged
  deltas), and for non-streaming requests too. It runs once per engine step, so where the
  method has the parameters of vLLM 0.33 the wrapper has them too and passes them on as they
  came (``_SIGNATURE``): a ``*args, **kwargs`` wrapper, kept for any other signature, spends
  more on packing and unpacking the arguments than on counting.
- ``abort_requests``: a tied request that vLLM aborts (its client left, ``with_cancellation``
  cancelled the handler, ``generate`` was closed) is marked ``engine_abort`` (outcome
  ``cancelled``) and counted in ``otel_disconnect_llm_engine_aborted_requests_total`` and
  ``otel_disconnect_llm_engine_aborted_tokens_total`` (tokens it had generated), by model and
  phase. A request aborted while still queued generated 0 tokens and counts 0.

Each HTTP request's ``EngineMark`` counts its engine requests still running, from
``add_request`` until they finish or are aborted: a final body sent after the disconnect while
one still runs is a placeholder to the outcome rule (vLLM 0.13's ``with_cancellation`` sends
``null`` before the cancelled handler has aborted the engine).

The model label is vLLM's served model name, read from the ``AsyncLLM`` in ``generate`` (no
wrapper around the generator it returns) into ``state.extras[ENGINE_KEY]``. vLLM is never
imported here: the classes are patched when vLLM imports its module (a post-import hook), or at
once when it already has. Each wrapper keeps the original under ``_otel_disconnect_original``.
"""

from __future__ import annotations

import importlib.util
import inspect
import time
import types
from typing import Any

from ..context import current_state
from ..failsafe import internal_error
from ..state import STOPPED_ENGINE_ABORT, Extension, RequestState
from ..telemetry.metrics import metrics_for
from .account import ENGINE, ENGINE_KEY, Segment, TokenAccount, account_for
from .import_hooks import PatchOnImport

OUTPUT_PROCESSOR = "vllm.v1.engine.output_processor"
ASYNC_LLM = "vllm.v1.engine.async_llm"
_MARK = "_otel_disconnect_original"
PHASE_CONNECTED = "connected"  # aborted while the client was still there (an error, a stop)
# OutputProcessor.process_outputs in vLLM 0.33 (parameters after self, all defaulting to None
# after the first); the fast wrapper is used only when the method has exactly these.
_SIGNATURE = ("engine_core_outputs", "engine_core_timestamp", "iteration_stats", "weight_version")


class EngineRequest:
    """One engine request tied to an HTTP request: its segment of the token account; counted
    live in the request's ``EngineMark`` (when given) until it finishes or is aborted."""

    __slots__ = ("account", "mark", "model", "segment", "state")

    def __init__(
        self, state: RequestState, model: str | None, mark: EngineMark | None = None
    ) -> None:
        self.state = state
        self.mark = mark
        if mark is not None:
            mark.live += 1
        self.account: TokenAccount = account_for(state)
        self.account.set_model(model, explicit=True)
        self.model = model
        self.segment = Segment(time.perf_counter())
        self.account.tally(ENGINE).add_segment(self.segment, state.detected_perf)

    def counted(self, n: int) -> None:
        self.account.counted(self.state, self.segment, n, delivered=False)

    def finished(self) -> None:
        if self.mark is not None:
            self.mark.live -= 1
        self.account.tally(ENGINE).close(self.segment, self.state.detected_perf)
        if self.state.ended:
            self.account.late(self.state)

    def aborted(self) -> None:
        state = self.state
        state.note_work_stopped(STOPPED_ENGINE_ABORT)
        tokens = self.segment.counted
        metrics = state.metrics or metrics_for(None)
        phase = state.phase if state.detected_perf is not None else PHASE_CONNECTED
        model = metrics.model_label(self.model)
        metrics.llm_engine_aborted_requests.labels(model, phase).inc()
        if tokens:
            metrics.llm_engine_aborted_tokens.labels(model, phase).inc(tokens)
        self.finished()


# Engine request id -> its EngineRequest, from add_request until it finishes or is aborted.
_live: dict[str, EngineRequest] = {}


def instrument_vllm_engine() -> bool:
    """Patch vLLM's output processor once per process, now or when vLLM is imported (never
    imported here); False when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return False
    _hooks.enable()
    return True


def _patch(mod: types.ModuleType) -> None:
    if mod.__name__ == OUTPUT_PROCESSOR:
        _patch_output_processor(mod.OutputProcessor)
    elif mod.__name__ == ASYNC_LLM:
        _patch_async_llm(mod.AsyncLLM)


def _patch_async_llm(cls: Any) -> None:
    original = cls.generate
    if hasattr(original, _MARK):
        return

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = current_state()
        if state is not None:
            try:
                name = self.model_config.served_model_name
                if isinstance(name, (list, tuple)):
                    name = name[0] if name else None
                mark: EngineMark = state.extra(ENGINE_KEY, EngineMark)
                if name and mark.model is None:
                    mark.model = str(name)
            except Exception:
                internal_error("vllm_engine")
        return original(self, *args, **kwargs)

    setattr(generate, _MARK, original)
    cls.generate = generate


def _patch_output_processor(cls: Any) -> None:
    if hasattr(cls.process_outputs, _MARK):
        return
    original_add = cls.add_request
    original_process = cls.process_outputs
    original_abort = cls.abort_requests

    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_add(self, request, *args, **kwargs)
        state = current_state()
        if state is not None:
            try:
                request_id = request.request_id
                if request_id not in _live:
                    mark: EngineMark = state.extra(ENGINE_KEY, EngineMark)
                    _live[request_id] = EngineRequest(state, mark.model, mark)
            except Exception:
                internal_error("vllm_engine")
        return result

    def process_outputs_known(
        self: Any,
        engine_core_outputs: Any,
        engine_core_timestamp: Any = None,
        iteration_stats: Any = None,
        weight_version: Any = None,
    ) -> Any:
        if _live:
            try:
                _count_outputs(engine_core_outputs)
            except Exception:
                internal_error("vllm_engine")
        return original_process(
            self, engine_core_outputs, engine_core_timestamp, iteration_stats, weight_version
        )

    def process_outputs_any(self: Any, engine_core_outputs: Any, *args: Any, **kwargs: Any) -> Any:
        if _live:
            try:
                _count_outputs(engine_core_outputs)
            except Exception:
                internal_error("vllm_engine")
        return original_process(self, engine_core_outputs, *args, **kwargs)

    process_outputs = (
        process_outputs_known if _has_signature(original_process) else process_outputs_any
    )

    def abort_requests(self: Any, *args: Any, **kwargs: Any) -> Any:
        aborted = original_abort(self, *args, **kwargs)
        if _live:
            try:
                for request_id in aborted or ():
                    found = _live.pop(request_id, None)
                    if found is not None:
                        found.aborted()
            except Exception:
                internal_error("vllm_engine")
        return aborted

    for wrapper, wrapped in (
        (add_request, original_add),
        (process_outputs, original_process),
        (abort_requests, original_abort),
    ):
        setattr(wrapper, _MARK, wrapped)
    cls.add_request = add_request
    cls.process_outputs = process_outputs
    cls.abort_requests = abort_requests


def _has_signature(method: Any) -> bool:
    """Whether ``method`` takes exactly vLLM 0.33's ``process_outputs`` parameters, each after
    the first defaulting to None, so that a wrapper with the same ones passes every call on
    unchanged."""
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return False
    if len(params) != len(_SIGNATURE) + 1:
        return False
    for i, (param, name) in enumerate(zip(params[1:], _SIGNATURE, strict=True)):
        if param.name != name or param.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            return False
        if i and param.default is not None:
            return False
    return params[1].default is inspect.Parameter.empty


def _count_outputs(engine_core_outputs: Any) -> None:
    """Count the token ids of each engine output tied to a request (any vLLM signature)."""
    live = _live
    for output in engine_core_outputs:
        found = live.get(output.request_id)
        if found is not None:
            n = len(output.new_token_ids)
            state = found.state
            if state.detected_perf is None and not state.ended:
                # The hot path, in vLLM's output loop: nothing to split yet, no lock
                # (record_tokens() threads never touch an engine segment).
                found.segment.counted += n
            else:
                found.counted(n)
            if output.finish_reason is not None:
                _finished(output)


def _finished(output: Any) -> None:
    """The last output of a tied engine request: aborted by the engine, or done."""
    found = _live.pop(output.request_id)
    if getattr(output.finish_reason, "name", "") == "ABORT":
        found.aborted()  # the engine itself gave up on it
    else:
        found.finished()


class EngineMark(Extension):
    """``state.extras[ENGINE_KEY]``: the engine counts this request's tokens (the response and
    upstream parsers skip it); the served model name its ``AsyncLLM`` reported; how many of its
    engine requests are still running (``work_running``, read by the outcome rule)."""

    __slots__ = ("live", "model")

    def __init__(self) -> None:
        self.model: str | None = None
        self.live = 0

    def work_running(self, state: RequestState) -> bool:
        return self.live > 0


_hooks = PatchOnImport((OUTPUT_PROCESSOR, ASYNC_LLM), _patch, "vllm_engine")
