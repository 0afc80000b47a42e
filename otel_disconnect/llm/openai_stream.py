"""Incremental parsers for OpenAI-compatible responses: pure functions over bytes, no I/O.

``SSEUsageParser`` reads a ``text/event-stream`` of chat-completion or completion chunks;
``JSONUsageParser`` reads a non-streaming body. Both take bytes in pieces of any size, keep at most
``max_buffer`` bytes, skip what they cannot parse (malformed JSON, non-UTF-8, giant lines) and
never raise on input.

Counting rules (documented in the README):
- a chunk counts one token per choice whose delta carries content, reasoning content, a refusal
  or tool-call arguments (chat), or non-empty ``text`` (completions): servers stream one token
  per chunk, so this is exact for vLLM and OpenAI and an approximation for batched chunks;
- a chunk with both choices and ``usage`` (vLLM ``continuous_usage_stats``) counts by the
  cumulative ``usage.completion_tokens`` instead;
- a ``usage`` chunk without choices (``stream_options.include_usage``) is the authoritative total;
- an event whose data names none of ``"choices"``, ``"usage"``, ``"model"`` is not parsed at all
  (servers write these keys plainly); a stream whose first ``FOREIGN_EVENTS`` data events are all
  such is not a completion stream (progress events, logs) and is no longer read (``foreign``).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_EVENT_BYTES = 256 * 1024
FOREIGN_EVENTS = 3
MAX_JSON_BYTES = 1024 * 1024
_TAIL_BYTES = 8 * 1024

# Inside a JSON string a quote is escaped, so this cannot match text inside the content.
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')
# Searched with bytes.find(): ``key in data`` first tries the key as an integer (a byte value)
# and builds and clears a TypeError on every call, which costs more than the search itself.
COMPLETION_KEY = b'"completion_tokens"'  # a JSON body without it has no usage
_CHOICES_KEY = b'"choices"'
_USAGE_KEY = b'"usage"'
_MODEL_KEY = b'"model"'
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')


def _choice_has_output(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        for key in ("content", "reasoning_content", "reasoning", "refusal"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                return True
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and (fn.get("arguments") or fn.get("name")):
                    return True
        return False
    text = choice.get("text")
    return isinstance(text, str) and bool(text)


def _completion_tokens(usage: Any) -> int | None:
    if not isinstance(usage, dict):
        return None
    value = usage.get("completion_tokens")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _model_of(obj: dict[str, Any]) -> str | None:
    model = obj.get("model")
    return model if isinstance(model, str) and model else None


class SSEUsageParser:
    """Counts tokens in a stream of SSE ``data:`` events; ``feed()`` returns the new ones."""

    __slots__ = (
        "_after_cr",
        "_buffer",
        "_cumulative",
        "_data",
        "_others",
        "_seen_chunk",
        "_skipping",
        "counted",
        "done",
        "malformed",
        "max_buffer",
        "model",
        "usage_total",
    )

    def __init__(self, max_buffer: int = MAX_EVENT_BYTES) -> None:
        self.max_buffer = max_buffer
        self._buffer = bytearray()  # the current, unfinished line
        self._data = bytearray()  # the data lines of the current event
        self._skipping = False  # inside a line longer than max_buffer: drop it to its end
        self._after_cr = False  # the last piece ended with "\r": a leading "\n" ends nothing
        self._cumulative = 0  # the last cumulative usage.completion_tokens seen on a chunk
        self._seen_chunk = False  # an event that names a chunk key was seen
        self._others = 0  # data events that named none
        self.counted = 0
        self.usage_total: int | None = None
        self.model: str | None = None
        self.done = False
        self.malformed = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer) + len(self._data)

    @classmethod
    def after_foreign(cls, others: int) -> SSEUsageParser:
        """A parser in the state of one fed ``others`` foreign single events (``foreign_event``)."""
        parser = cls()
        parser._others = others
        return parser

    @property
    def foreign(self) -> bool:
        """The stream opened with FOREIGN_EVENTS data events that were not completion chunks:
        it is some other event stream, and reading it further costs without counting."""
        return self._others >= FOREIGN_EVENTS and not self._seen_chunk

    def feed(self, data: bytes) -> int:
        """Consume ``data``; return the tokens counted in the events it completed."""
        if self._others >= FOREIGN_EVENTS and not self._seen_chunk:
            return 0  # not a completion stream (see foreign)
        if (
            data.endswith(b"\n\n")
            and not self._buffer
            and not self._data
            and not self._skipping
            and not self._after_cr
            and len(data) <= self.max_buffer
            and data.find(b"\r") < 0
        ):
            # What servers send: whole events ending in "\n\n", one or a few per body chunk.
            # Split in C instead of walking line ends; the same rules as below otherwise.
            return self._feed_events(data)
        before = self.counted
        start = 0
        end = len(data)
        if self._after_cr and data[:1] == b"\n":
            start = 1
        self._after_cr = False
        while start < end:
            newline = _next_newline(data, start)
            if newline < 0:
                self._append(data, start, end)
                break
            self._append(data, start, newline)
            self._line_end()
            start = newline + 1
            if data[newline] == 13:  # "\r\n" is one line end
                if start == end:
                    self._after_cr = True
                elif data[start] == 10:
                    start += 1
        return self.counted - before

    def _feed_events(self, data: bytes) -> int:
        before = self.counted
        lines = data.split(b"\n")
        lines.pop()  # the empty piece after the last "\n"
        values: list[bytes] = []
        for line in lines:
            if not line:
                if values:
                    self._dispatch_payload(b"\n".join(values))
                    values = []
            elif line.startswith(b"data:"):
                values.append(line[6:] if line[5:6] == b" " else line[5:])
        return self.counted - before

    def _append(self, data: bytes, start: int, end: int) -> None:
        if self._skipping or start == end:
            return
        if len(self._buffer) + len(self._data) + (end - start) > self.max_buffer:
            self._buffer.clear()
            self._data.clear()
            self._skipping = True
            self.malformed += 1
            return
        self._buffer += data[start:end]

    def _line_end(self) -> None:
        if self._skipping:
            self._skipping = False
            return
        line = self._buffer
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            if self._data:
                self._data += b"\n"
            self._data += value
        self._buffer = bytearray()

    def _dispatch(self) -> None:
        if not self._data:
            return
        payload = bytes(self._data)
        self._data.clear()
        self._dispatch_payload(payload)

    def _dispatch_payload(self, payload: bytes) -> None:
        if not _names_chunk_key(payload):
            # Nothing in it could count or name the model (a chunk names its keys plainly):
            # other SSE streams (progress events, logs) are not parsed at all.
            if payload.strip() == b"[DONE]":
                self.done = True
            else:
                self._others += 1
            return
        self._seen_chunk = True
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            self.malformed += 1
            return
        if isinstance(obj, dict):
            self._chunk(obj)

    def _chunk(self, obj: dict[str, Any]) -> None:
        if self.model is None:
            self.model = _model_of(obj)
        choices = obj.get("choices")
        usage = _completion_tokens(obj.get("usage"))
        if usage is not None and not choices:
            self.usage_total = usage
            return
        if usage is not None:
            # Continuous usage stats: cumulative per chunk, exact even for multi-token chunks.
            if usage > self._cumulative:
                self.counted += usage - self._cumulative
                self._cumulative = usage
            return
        if isinstance(choices, list):
            self.counted += sum(1 for choice in choices if _choice_has_output(choice))


def foreign_event(data: bytes) -> bool | None:
    """Whether ``data``, a body chunk at an event boundary, is one whole event that a completion
    stream would not send, decided with a few searches in C and no parser.

    True: a single data event naming none of the chunk keys (``SSEUsageParser`` would count it
    towards ``foreign``); False: a single event with no data line (a comment or keep-alive, which
    the parser ignores); None: anything else (a completion chunk, several events, a partial
    event, ``[DONE]``), which only the parser can decide.
    """
    if (
        not data.endswith(b"\n\n")
        or data.find(b"\n\n") != len(data) - 2
        or len(data) > MAX_EVENT_BYTES
        or data.find(b"\r") >= 0
        or _names_chunk_key(data)
        or data.find(b"[DONE]") >= 0
    ):
        return None
    return data.startswith(b"data:") or data.find(b"\ndata:") >= 0


def _names_chunk_key(data: bytes) -> bool:
    """Whether ``data`` names a key a completion chunk has: the one rule for which events the
    parser reads and which ``foreign_event`` may screen out."""
    return data.find(_CHOICES_KEY) >= 0 or data.find(_USAGE_KEY) >= 0 or data.find(_MODEL_KEY) >= 0


def _next_newline(data: bytes, start: int) -> int:
    lf = data.find(b"\n", start)
    cr = data.find(b"\r", start, lf if lf >= 0 else len(data))
    return cr if cr >= 0 else lf


class JSONUsageParser:
    """Reads ``usage.completion_tokens`` and ``model`` from a non-streaming response body.

    Bodies up to ``max_buffer`` are parsed as JSON; past that only the head (for ``model``) and a
    short tail (``usage`` comes last in OpenAI-shaped bodies) are kept and searched.
    """

    __slots__ = ("_body", "_head", "_overflow", "max_buffer", "model", "usage_total")

    def __init__(self, max_buffer: int = MAX_JSON_BYTES) -> None:
        self.max_buffer = max_buffer
        self._body = bytearray()
        self._head = b""
        self._overflow = False
        self.usage_total: int | None = None
        self.model: str | None = None

    @property
    def buffered(self) -> int:
        return len(self._body) + len(self._head)

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if not self._overflow and len(self._body) + len(data) <= self.max_buffer:
            self._body += data
            return
        if not self._overflow:
            self._overflow = True
            self._head = bytes(self._body[:_TAIL_BYTES])
        self._body += data[-_TAIL_BYTES:]
        if len(self._body) > _TAIL_BYTES:
            del self._body[: len(self._body) - _TAIL_BYTES]

    def finish(self) -> int | None:
        """Parse what was fed; return the completion tokens, or None when the body has none."""
        body = bytes(self._body)
        self._body = bytearray()
        if body.find(COMPLETION_KEY) < 0 and self._head.find(COMPLETION_KEY) < 0:
            # Most JSON responses are not completions: one search instead of a parse.
            self._head = b""
            return None
        if not self._overflow:
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError):
                obj = None
            if isinstance(obj, dict):
                self.model = _model_of(obj)
                self.usage_total = _completion_tokens(obj.get("usage"))
            return self.usage_total
        found = _MODEL.search(self._head)
        if found:
            self.model = found.group(1).decode("utf-8", "replace")
        matches = _COMPLETION_TOKENS.findall(body)
        if matches:
            self.usage_total = int(matches[-1])
        self._head = b""
        return self.usage_total
