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
- a usage figure counts only when it is an integer in ``0 .. MAX_USAGE`` (``usage_figure``); any
  other value (a float, ``1e30``, ``10**400``, a string) is malformed input, skipped and counted
  in ``malformed``, by every path alike (SSE, JSON bodies of any size, upstream streams);
- a chunk event is first read by a byte scan (``quick_count``): a single-choice chunk whose
  ``usage`` is absent or null is counted from the bytes of its output keys and never parsed;
  the JSON parser reads only the events the scan cannot decide: those that carry a usage figure,
  several choices or tool calls, values of an unusual type or layout, the model name when it is
  not plain. The scan checks the event's outline (``{...}``, the choices array closed) but not
  the JSON between the keys it reads: a broken event that still reads as a one-token chunk
  counts one token;
- once a stream's token chunks follow one template (``_learn``), body chunks may be counted
  many at a time (``feed_many``): joined, a run of whole template events is recognised with a few
  searches in C over the run instead of a few calls per chunk, and anything else in the run is
  fed chunk by chunk, in order, exactly as ``feed`` would have;
- an event whose data names none of ``"choices"``, ``"usage"``, ``"model"`` is not parsed at all
  (servers write these keys plainly); a stream whose first ``FOREIGN_EVENTS`` data events are all
  such is not a completion stream (progress events, logs) and is no longer read (``foreign``).
"""

from __future__ import annotations

import json
import operator
import re
from typing import Any

MAX_EVENT_BYTES = 256 * 1024
FOREIGN_EVENTS = 3
MAX_JSON_BYTES = 1024 * 1024
_TAIL_BYTES = 8 * 1024

# The largest usage figure taken as real: what a 32-bit counter holds. Larger ones, negatives and
# non-integers are malformed input (a buggy or hostile upstream), never arithmetic.
MAX_USAGE = 2**31 - 1

# Inside a JSON string a quote is escaped, so these cannot match text inside the content.
_COMPLETION_TOKENS_KEY = re.compile(rb'"completion_tokens"[ \t\n\r]*:[ \t\n\r]*')
# A JSON integer ending where its value ends: "12.5", "1e30", "12abc" do not match.
_JSON_INTEGER = re.compile(rb"(-?(?:0|[1-9][0-9]*))[ \t\n\r]*[,}]")
# Searched with bytes.find(): ``key in data`` first tries the key as an integer (a byte value)
# and builds and clears a TypeError on every call, which costs more than the search itself.
COMPLETION_KEY = b'"completion_tokens"'  # a JSON body without it has no usage
_CHOICES_KEY = b'"choices"'
_USAGE_KEY = b'"usage"'
_MODEL_KEY = b'"model"'
_MODEL = re.compile(rb'"model"[ \t\n\r]*:[ \t\n\r]*"([^"\\]{1,200})"')


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


def usage_figure(value: Any) -> int | None:
    """``value`` as a token count: an ``int`` (not a bool) in ``0 .. MAX_USAGE``, else None."""
    if type(value) is int and 0 <= value <= MAX_USAGE:
        return value
    return None


def _usage_from_text(body: bytes) -> int | bool | None:
    """The last ``"completion_tokens"`` of a body too large to parse, read from its bytes: the
    figure, None when there is no such key, False when its value is not a valid figure."""
    last = None
    for last in _COMPLETION_TOKENS_KEY.finditer(body):  # noqa: B007 (the last one is wanted)
        pass
    if last is None:
        return None
    found = _JSON_INTEGER.match(body, last.end())
    if found is None or len(found.group(1)) > 12:  # longer is out of range anyway
        return False
    figure = usage_figure(int(found.group(1)))
    return False if figure is None else figure


def _completion_tokens(usage: Any) -> int | bool | None:
    """The usage figure of a ``usage`` object: None when there is none, False when it is not
    valid (malformed input)."""
    if not isinstance(usage, dict) or "completion_tokens" not in usage:
        return None
    figure = usage_figure(usage["completion_tokens"])
    return False if figure is None else figure


def _model_of(obj: dict[str, Any]) -> str | None:
    model = obj.get("model")
    return model if isinstance(model, str) and model else None


class SSEUsageParser:
    """Counts tokens in a stream of SSE ``data:`` events; ``feed()`` returns the new ones."""

    __slots__ = (
        "_after_cr",
        "_buffer",
        "_cumulative",
        "_cut",
        "_data",
        "_head",
        "_others",
        "_seam",
        "_seen_chunk",
        "_skipping",
        "_tail",
        "by_chunks",
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
        # The stream's chunk template (see _learn): a body chunk that starts with _head and ends
        # with _tail is one more one-token chunk of the same stream.
        self._head: bytes | None = None
        self._tail = b""
        self._seam = b""  # _tail + _head: where one template event ends and the next begins
        self._cut = _NO_CUT  # a chunk's content at the template's offsets
        self.counted = 0
        # Some tokens were counted one per chunk output (no usage figure said how many): an
        # estimate wherever a chunk can carry several tokens.
        self.by_chunks = False
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

    @property
    def templated(self) -> bool:
        """At an event boundary of a stream whose token chunk template is known: what
        ``feed_many`` counts fastest."""
        return self._head is not None and not (
            self._buffer or self._data or self._skipping or self._after_cr
        )

    def feed_many(self, chunks: list[bytes]) -> int:
        """``feed()`` each of ``chunks`` in order; return the tokens counted. A run of template
        chunks is counted at once; the chunks that end a stream (a finish reason, a usage
        figure, ``[DONE]``) and anything unusual are fed one by one."""
        before = self.counted
        end = len(chunks)
        tail = self._tail
        while end and not chunks[end - 1].endswith(tail):
            end -= 1  # the stream's last chunks are not token chunks: fed alone, after the run
        self._feed_run(chunks, 0, end)
        for i in range(end, len(chunks)):
            self.feed(chunks[i])
        return self.counted - before

    def _feed_run(self, chunks: list[bytes], start: int, end: int) -> None:
        if end - start == 1:
            self.feed(chunks[start])
        elif end > start:
            run = chunks[start:end]
            if self.templated and self._template_chunks(run):
                self.counted += len(run)
            else:  # something in the run is not a template chunk: find it by halves
                middle = (start + end) // 2
                self._feed_run(chunks, start, middle)
                self._feed_run(chunks, middle, end)

    def _template_chunks(self, chunks: list[bytes]) -> bool:
        """Whether every one of ``chunks`` is a template chunk that ``feed`` counts one token:
        ``head + content + tail``, the content non-empty, not starting with a quote, holding no
        "}" or line end. A few calls in C for the whole run: the contents are cut at the
        template's offsets, and the chunks joined must equal the template put back around them
        (a chunk of any other head, tail or length makes a difference somewhere)."""
        head = self._head
        if head is None:
            return False
        contents = list(map(self._cut, chunks))
        # Compared in place, not rebuilt as head + middle + tail: two copies of the whole batch
        # fewer (glibc copies such sizes with "rep movsb", a few instructions per byte).
        whole = b"".join(chunks)
        middle = self._seam.join(contents)
        at = len(head)
        if not (
            len(whole) == at + len(middle) + len(self._tail)
            and whole.startswith(middle, at)
            and whole.startswith(head)
            and whole.endswith(self._tail)
        ):
            return False
        # The contents joined by line ends, which no content may hold: counting them finds one
        # that does; then an empty content shows as two together, or one at an end.
        joined = b"\n".join(contents)
        return (
            joined.count(b"\n") == len(contents) - 1
            and joined.find(b"}") < 0
            and joined[0] not in _NOT_FIRST
            and joined[-1] != 10
            and joined.find(b'\n"') < 0
            and joined.find(b"\n\n") < 0
        )

    def feed(self, data: bytes) -> int:
        """Consume ``data``; return the tokens counted in the events it completed."""
        head = self._head
        if head is not None and data.startswith(head) and data.endswith(self._tail):
            # The stream's next token chunk: the same bytes around a different content string.
            # Its content is non-empty and holds no "}" or line end (so no other event, choice
            # or usage object hides in it): exactly one token, as the parser would count it.
            at = len(head)
            end = len(data) - len(self._tail)
            if (
                end > at
                and data[at] != 34
                and data.find(b"}", at, end) < 0
                and data.find(b"\n", at, end) < 0
            ):
                self.counted += 1
                return 1
        if self._others >= FOREIGN_EVENTS and not self._seen_chunk:
            return 0  # not a completion stream (see foreign)
        if not (self._buffer or self._data or self._skipping or self._after_cr):
            end = len(data) - 2
            # What servers send: one whole event per body chunk, "data: {...}\n\n". Read in
            # place, no copy, the same rules as below.
            if (
                data.find(b"\n") == end
                and data.startswith(b"data:")
                and data.endswith(b"\n")
                and end <= self.max_buffer
                and data.find(b"\r", 0, end) < 0
            ):
                before = self.counted
                self._dispatch(data, 6 if data[5:6] == b" " else 5, end)
                if self.counted - before == 1 and self._head is None:
                    self._learn(data)
                return self.counted - before
            if data.endswith(b"\n\n") and len(data) <= self.max_buffer and data.find(b"\r") < 0:
                # Several whole events: split in C instead of walking line ends.
                return self._feed_events(data)
        self._head = None  # events split across body chunks: no template until they line up
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

    def _learn(self, data: bytes) -> None:
        """Keep ``data``, a single-event body chunk counted as one token, as the stream's
        template when it has the plain layout of vLLM's and most servers' token chunks:
        ``data: {..."choices":[{..."delta":{"content":"`` + text + ``"},...}]}`` with the delta
        holding nothing else, no usage figure, one choice, and a suffix that holds no object."""
        delta = data.find(_TEMPLATE_DELTA)
        if delta < 0:
            return
        start = delta + len(_TEMPLATE_DELTA)
        close = data.find(b'"', start)
        if (
            close <= start
            or data.find(b"\\", start, close) >= 0
            or not data.startswith(b'"}', close)
            or data.find(b"{", close) >= 0
            or data.find(_DELTA_KEY, 0, delta) >= 0
            or data.find(b'"choices":[{', 0, delta) < 0
        ):
            return
        usage = data.find(_USAGE_KEY)
        if usage >= 0 and not data.startswith(b'"usage":null', usage):
            return
        if data.find(_USAGE_KEY, usage + 7) >= 0:
            return
        self._head = data[:start]
        self._tail = data[close:]
        self._seam = self._tail + self._head
        self._cut = operator.itemgetter(slice(start, close - len(data)))

    def _feed_events(self, data: bytes) -> int:
        before = self.counted
        lines = data.split(b"\n")
        lines.pop()  # the empty piece after the last "\n"
        values: list[bytes] = []
        for line in lines:
            if not line:
                if values:
                    payload = b"\n".join(values)
                    self._dispatch(payload, 0, len(payload))
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
            if self._data:
                payload = bytes(self._data)
                self._data.clear()
                self._dispatch(payload, 0, len(payload))
        elif line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            if self._data:
                self._data += b"\n"
            self._data += value
        self._buffer = bytearray()

    def _dispatch(self, data: bytes, start: int, end: int) -> None:
        """One event's data, ``data[start:end]``: counted from its bytes when the scan can
        tell, else parsed."""
        if start == end or (self._others >= FOREIGN_EVENTS and not self._seen_chunk):
            # "data:" with nothing after it (the line walker drops it too), or an event after
            # the stream was given up in the same body chunk.
            return
        choices = data.find(_CHOICES_KEY, start, end)
        if choices < 0 and not _names_chunk_key(data, start, end):
            # Nothing in it could count or name the model (a chunk names its keys plainly):
            # other SSE streams (progress events, logs) are not parsed at all.
            if data[start:end].strip() == b"[DONE]":
                self.done = True
            else:
                self._others += 1
            return
        self._seen_chunk = True
        if choices >= 0 and (self.model is not None or self._scan_model(data, start, end)):
            n = quick_count(data, choices, start, end)
            if n is not None:
                if n:
                    self.counted += n
                    self.by_chunks = True
                return
        try:
            obj = json.loads(data[start:end])
        except (ValueError, RecursionError):
            self.malformed += 1
            return
        if isinstance(obj, dict):
            self._chunk(obj)

    def _scan_model(self, data: bytes, start: int, end: int) -> bool:
        """Read the model name from the bytes (once per stream); False when only the parser can
        (escapes, an odd layout)."""
        if data.find(_MODEL_KEY, start, end) < 0:
            return True  # no model named: the parser would find none either
        found = _MODEL.search(data, start, end)
        if found is None:
            return False
        try:
            self.model = found.group(1).decode()
        except UnicodeDecodeError:
            return False
        return True

    def _chunk(self, obj: dict[str, Any]) -> None:
        if self.model is None:
            self.model = _model_of(obj)
        choices = obj.get("choices")
        usage = _completion_tokens(obj.get("usage"))
        if usage is False:
            self.malformed += 1  # a usage figure that is not one: counted by its chunks
            usage = None
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
            n = sum(1 for choice in choices if _choice_has_output(choice))
            if n:
                self.counted += n
                self.by_chunks = True


# The separator of template events joined (feed_many): a control character, which a JSON text
# never holds raw (inside strings it is escaped), so its absence is checked, never assumed.
_NO_CUT = operator.itemgetter(slice(0, 0))
_NOT_FIRST = frozenset(b'\n"')  # a content that is empty, or starts with a quote

# The keys the byte scan reads. A key is found only where it is one: inside a JSON string every
# quote is escaped, so '"content":' cannot match text inside a value.
_DELTA_KEY = b'"delta":'
_TEMPLATE_DELTA = b'"delta":{"content":"'
_CONTENT_KEY = b'"content":'
_OTHER_OUTPUT_KEYS = (b'"reasoning_content":', b'"reasoning":', b'"refusal":')
_TEXT_KEY = b'"text":'
_TOOL_CALLS_KEY = b'"tool_calls":'
_FUNCTION_KEY = b'"function":'
_ARGUMENTS_KEY = b'"arguments":'
_NAME_KEY = b'"name":'


def quick_count(data: bytes, choices: int, start: int, end: int) -> int | None:
    """The tokens of the chunk ``data[start:end]`` (``choices``: where it names ``"choices"``),
    read from its bytes as ``SSEUsageParser`` would count them parsed: 1 when its one choice
    carries output, 0 when it carries none; None when only the parser can tell (a usage figure,
    several choices, values of an unusual type or layout)."""
    if data[start] != 123 or data[end - 1] != 125 or data.rfind(b"]", choices, end) < 0:
        return None  # not "{...}" with the choices array closed: the parser says what it is
    usage = data.find(_USAGE_KEY, start, end)
    if usage >= 0 and not (
        (data.startswith(b":null", usage + 7) or data.startswith(b": null", usage + 7))
        and data.find(_USAGE_KEY, usage + 7, end) < 0
    ):
        return None  # a usage figure (or something unusual): parsed
    delta = data.find(_DELTA_KEY, choices, end)
    if delta < 0:  # a completions chunk: {"choices": [{"text": ...}]}
        text = data.find(_TEXT_KEY, choices, end)
        if text < 0 or data.find(_TEXT_KEY, text + 7, end) >= 0:
            return None
        return _string_value(data, text + 7)
    at = delta + 8
    if data.find(_DELTA_KEY, at, end) >= 0:
        return None  # several choices
    if data[at] == 32:
        at += 1
    if data[at] != 123:
        return None  # a delta that is not an object
    found = _string_value(data, data.find(_CONTENT_KEY, at, end), 10)
    if found != 0:
        return found
    for key in _OTHER_OUTPUT_KEYS:
        found = _string_value(data, data.find(key, at, end), len(key))
        if found != 0:
            return found
    tools = data.find(_TOOL_CALLS_KEY, at, end)
    if tools < 0:
        return 0
    function = data.find(_FUNCTION_KEY, tools, end)
    if function < 0:
        return 0
    if data.find(_FUNCTION_KEY, function + 11, end) >= 0:
        return None  # several calls
    found = _string_value(data, data.find(_ARGUMENTS_KEY, function, end), 12)
    if found != 0:
        return found
    return _string_value(data, data.find(_NAME_KEY, function, end), 7)


def _string_value(data: bytes, key: int, length: int = 0) -> int | None:
    """At ``key + length`` (just after a key's colon, in an event that ends with "}"): 1 for a
    non-empty string, 0 for an empty one, null, or no key (``key`` < 0), None for anything else."""
    if key < 0:
        return 0
    at = key + length
    if data[at] == 32:
        at += 1
    first = data[at]
    if first == 34:  # '"'
        return 0 if data[at + 1] == 34 else 1
    if first == 110 and data.startswith(b"null", at):
        return 0
    return None


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


def _names_chunk_key(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether ``data[start:end]`` names a key a completion chunk has: the one rule for which
    events the parser reads and which ``foreign_event`` may screen out."""
    if end is None:
        end = len(data)
    return (
        data.find(_CHOICES_KEY, start, end) >= 0
        or data.find(_USAGE_KEY, start, end) >= 0
        or data.find(_MODEL_KEY, start, end) >= 0
    )


def _next_newline(data: bytes, start: int) -> int:
    lf = data.find(b"\n", start)
    cr = data.find(b"\r", start, lf if lf >= 0 else len(data))
    return cr if cr >= 0 else lf


class JSONUsageParser:
    """Reads ``usage.completion_tokens`` and ``model`` from a non-streaming response body.

    Bodies up to ``max_buffer`` are parsed as JSON; past that only the head (for ``model``) and a
    short tail (``usage`` comes last in OpenAI-shaped bodies) are kept and searched. Both read a
    usage figure by the same rule (``usage_figure``); a value that is not one is ``malformed``.
    """

    __slots__ = ("_body", "_head", "_overflow", "malformed", "max_buffer", "model", "usage_total")

    def __init__(self, max_buffer: int = MAX_JSON_BYTES) -> None:
        self.max_buffer = max_buffer
        self._body = bytearray()
        self._head = b""
        self._overflow = False
        self.usage_total: int | None = None
        self.model: str | None = None
        self.malformed = 0

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
                self.malformed += 1
            if isinstance(obj, dict):
                self.model = _model_of(obj)
                figure = _completion_tokens(obj.get("usage"))
                if figure is False:
                    self.malformed += 1
                elif figure is not None:
                    self.usage_total = figure
            return self.usage_total
        found = _MODEL.search(self._head)
        if found:
            self.model = found.group(1).decode("utf-8", "replace")
        figure = _usage_from_text(body)
        if figure is False:
            self.malformed += 1
        elif figure is not None:
            self.usage_total = figure
        self._head = b""
        return self.usage_total
