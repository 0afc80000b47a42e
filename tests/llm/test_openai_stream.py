"""The pure parsers: known shapes, then fuzzed bytes (no exception, bounded memory, counts >= 0)."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from otel_disconnect.llm import openai_stream
from otel_disconnect.llm.openai_stream import (
    FOREIGN_EVENTS,
    MAX_JSON_BYTES,
    MAX_USAGE,
    JSONUsageParser,
    SSEUsageParser,
    foreign_event,
    usage_figure,
)


def _chat(content: str | None = None, **extra: object) -> bytes:
    delta = {} if content is None else {"content": content}
    obj = {"id": "c", "object": "chat.completion.chunk", "model": "m1",
           "choices": [{"index": 0, "delta": delta, "finish_reason": None}], **extra}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _usage(n: int) -> bytes:
    obj = {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_chat_chunks_count_one_token_per_content_delta() -> None:
    parser = SSEUsageParser()
    stream = _chat("") + _chat("a") + _chat("b") + _chat(None) + b"data: [DONE]\n\n"
    assert parser.feed(stream) == 2
    assert parser.model == "m1"
    assert parser.done
    assert parser.usage_total is None


def test_tool_calls_and_completions_count() -> None:
    parser = SSEUsageParser()
    function = {"arguments": "{\""}
    call = {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": function}]}}]}
    text = {"choices": [{"index": 0, "text": "hi"}, {"index": 1, "text": "yo"}]}
    data = b"".join(b"data: " + json.dumps(o).encode() + b"\r\n\r\n" for o in (call, text))
    assert parser.feed(data) == 3


def test_split_anywhere_gives_the_same_count() -> None:
    stream = b"".join(_chat(f"t{i}") for i in range(20)) + _usage(21)
    for size in (1, 2, 3, 7, 64):
        parser = SSEUsageParser()
        total = sum(parser.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        assert total == 20
        assert parser.usage_total == 21


def test_crlf_split_between_pieces_is_one_line_end() -> None:
    parser = SSEUsageParser()
    parser.feed(b'data: {"choices":[{"text":"a"}]}\r')
    parser.feed(b'\ndata: {"choices":[{"text":"b"}]}\r\n\r\n')
    # One event with two data lines (not valid JSON joined); a split "\r\n" read as two line
    # ends would have dispatched the first line alone and counted it.
    assert parser.counted == 0
    assert parser.malformed == 1


def test_continuous_usage_counts_by_cumulative_completion_tokens() -> None:
    parser = SSEUsageParser()
    a = _chat("ab", usage={"completion_tokens": 2})
    b = _chat("cde", usage={"completion_tokens": 5})
    assert parser.feed(a + b) == 5
    assert parser.usage_total is None


def test_giant_line_is_dropped_with_bounded_memory() -> None:
    parser = SSEUsageParser(max_buffer=1024)
    parser.feed(b"data: " + b"x" * 5000)
    assert parser.buffered <= 1024
    parser.feed(b"y" * 5000 + b"\n\n" + _chat("ok"))
    assert parser.counted == 1
    assert parser.malformed == 1


def test_json_usage_small_and_large() -> None:
    body = json.dumps({"model": "m2", "choices": [{"message": {"content": "x"}}],
                       "usage": {"completion_tokens": 42}}).encode()
    parser = JSONUsageParser()
    for i in range(0, len(body), 5):
        parser.feed(body[i : i + 5])
    assert parser.finish() == 42
    assert parser.model == "m2"
    big = json.dumps({"model": "m3", "choices": [{"text": "w" * 50_000}],
                      "usage": {"completion_tokens": 7}}).encode()
    parser = JSONUsageParser(max_buffer=4096)
    for i in range(0, len(big), 1000):
        parser.feed(big[i : i + 1000])
        assert parser.buffered <= 4096 + 8192
    assert parser.finish() == 7
    assert parser.model == "m3"


def test_json_without_usage_or_not_json() -> None:
    for body in (b'{"hello": "world"}', b"\xff\xfe{", b"[1,2]",
                 b'{"usage": {"completion_tokens": -1}}',
                 b'{"content": "\\"completion_tokens\\": 5"}'):
        parser = JSONUsageParser()
        parser.feed(body)
        assert parser.finish() is None


_pieces = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.sampled_from([b"data: ", b"\n", b"\r\n", b"\r", b"\n\n", b"[DONE]", b"data: [DONE]\n\n",
                         _chat("x"), _usage(3), b'data: {"choices": [{"text": 1}]}\n\n',
                         b'data: {"usage": {"completion_tokens": "9"}}\n\n', b": ping\n\n",
                         b'data: {"choices": [{"delta": {"tool_calls": [null, {}]}}]}\n\n']),
        st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_pieces, st.integers(min_value=16, max_value=512))
def test_fuzzed_sse_never_raises_and_stays_bounded(pieces: list[bytes], cap: int) -> None:
    parser = SSEUsageParser(max_buffer=cap)
    total = 0
    for piece in pieces:
        n = parser.feed(piece)
        assert n >= 0
        total += n
        assert parser.buffered <= cap
    assert parser.counted == total >= 0
    assert parser.usage_total is None or parser.usage_total >= 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=400), max_size=30), st.integers(min_value=16, max_value=2048))
def test_fuzzed_json_never_raises_and_stays_bounded(pieces: list[bytes], cap: int) -> None:
    parser = JSONUsageParser(max_buffer=cap)
    for piece in pieces:
        parser.feed(piece)
        assert parser.buffered <= cap + 2 * 8192
    result = parser.finish()
    assert result is None or result >= 0


_events = st.lists(
    st.one_of(
        st.sampled_from([_chat("x"), _chat(""), _chat(None), _usage(4), b"data: [DONE]\n\n",
                         b": ping\n\n", b'data: {"token": 1}\n\n', b"event: progress\n\n",
                         b'data: {"choices": [{"text": "a"}]}\ndata: {"x": 1}\n\n',
                         b'data: {"choices": [{"text": "b"}]\n\n', b"\n\n",
                         b'data:{"model": "m9", "choices": []}\n\n']),
        st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"") + b"\n\n"),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(_events, st.integers(min_value=1, max_value=5))
def test_whole_events_and_byte_pieces_read_the_same(events: list[bytes], group: int) -> None:
    """Body chunks of whole events take the split-in-C path; byte-sized pieces the line walker."""
    whole, pieces = SSEUsageParser(), SSEUsageParser()
    for i in range(0, len(events), group):
        whole.feed(b"".join(events[i : i + group]))
    stream = b"".join(events)
    for i in range(len(stream)):
        pieces.feed(stream[i : i + 1])
    assert (whole.counted, whole.usage_total, whole.model, whole.done, whole.malformed) == (
        pieces.counted, pieces.usage_total, pieces.model, pieces.done, pieces.malformed)


def test_sse_that_is_not_openai_is_not_parsed() -> None:
    parser = SSEUsageParser()
    assert parser.feed(b'data: {"token": 1}\n\ndata: {not json\n\n') == 0
    assert parser.malformed == 0  # no chunk key in either: never handed to the JSON parser
    assert parser.feed(b'data: {"choices": [{"text": "a"}\n\n') == 0
    assert parser.malformed == 1


def test_a_stream_that_opens_with_other_events_is_given_up() -> None:
    parser = SSEUsageParser()
    others = b'data: {"progress": 1}\n\n: comment\n\nevent: x\ndata: 2\n\ndata: [DONE]\n\n'
    assert parser.feed(others) == 0 and not parser.foreign  # two data events, [DONE] not one
    assert parser.feed(b'data: {"progress": 3}\n\n') == 0
    assert parser.foreign
    assert parser.feed(_chat("late")) == 0  # no longer read
    assert parser.buffered == 0


def test_comments_and_one_other_event_before_chunks_still_count() -> None:
    parser = SSEUsageParser()
    stream = b": ping\n\n: ping\n\ndata: {\"status\": \"queued\"}\n\n" + _chat("a") + _chat("b")
    for i in range(0, len(stream), 7):
        parser.feed(stream[i : i + 7])
    assert parser.counted == 2 and not parser.foreign
    for _ in range(5):  # once chunks were seen, other events later change nothing
        parser.feed(b'data: {"progress": 1}\n\n')
    assert parser.feed(_chat("c")) == 1


def _screened(chunks: list[bytes]) -> tuple[SSEUsageParser | None, int]:
    """What the middleware does for an event stream (llm.response_tokens._PendingSSE): screen
    chunks with foreign_event() until one needs the parser; None once the stream is given up."""
    others = 0
    for i, chunk in enumerate(chunks):
        if not chunk:
            continue
        verdict = foreign_event(chunk)
        if verdict is None:
            parser = SSEUsageParser.after_foreign(others)
            for rest in chunks[i:]:
                parser.feed(rest)
            return parser, others
        others += verdict
        if others >= FOREIGN_EVENTS:
            return None, others
    return SSEUsageParser.after_foreign(others), others


@settings(max_examples=400, deadline=None)
@given(_events, st.integers(min_value=1, max_value=3), st.integers(min_value=0, max_value=7))
def test_screening_whole_events_reads_like_the_parser(
    events: list[bytes], group: int, cut: int
) -> None:
    """Screening in C, then the parser from the same state, counts exactly what the parser alone
    counts, for chunks of whole events or cut anywhere."""
    stream = b"".join(events)
    chunks = [b"".join(events[i : i + group]) for i in range(0, len(events), group)]
    if cut:
        chunks = [stream[i : i + cut] for i in range(0, len(stream), cut)]
    alone = SSEUsageParser()
    for chunk in chunks:
        alone.feed(chunk)
    screened, _ = _screened(chunks)
    if screened is None:
        assert alone.foreign and alone.counted == 0 and alone.usage_total is None
        return
    assert (screened.counted, screened.usage_total, screened.model, screened.malformed,
            screened.foreign) == (alone.counted, alone.usage_total, alone.model, alone.malformed,
                                  alone.foreign)


def test_foreign_event_verdicts() -> None:
    assert foreign_event(b'data: {"token": 1}\n\n') is True
    assert foreign_event(b'event: progress\ndata: 3\n\n') is True
    assert foreign_event(b": ping\n\n") is False
    assert foreign_event(_chat("a")) is None  # a completion chunk: for the parser
    assert foreign_event(b"data: [DONE]\n\n") is None
    assert foreign_event(b"data: 1\n\ndata: 2\n\n") is None  # two events
    assert foreign_event(b"data: 1\n") is None  # not at an event boundary
    assert foreign_event(b"data: 1\r\n\r\n") is None


# -- the byte scan against the JSON parser --------------------------------------------------------

_texts = st.one_of(
    st.none(), st.just(""), st.text(max_size=12),
    st.sampled_from(['"content":"x"', "}", "]}", '\\', '"}],"usage":{"completion_tokens":9}}',
                     "\n\ndata: ", "{", "tok"]),
)
_tool_calls = st.lists(
    st.fixed_dictionaries({"index": st.integers(0, 2), "type": st.just("function")}, optional={
        "function": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
            "name": st.one_of(st.none(), st.just(""), st.text(max_size=5)),
            "arguments": _texts,
        })),
    }),
    max_size=2,
)
_delta = st.fixed_dictionaries({}, optional={
    "role": st.just("assistant"), "content": _texts, "reasoning_content": _texts,
    "reasoning": _texts, "refusal": _texts, "tool_calls": _tool_calls,
})
_logprobs = st.one_of(st.none(), st.builds(
    lambda t: {"content": [{"token": t, "logprob": -0.5, "bytes": [116]}]}, st.text(max_size=4)))
_chat_choice = st.builds(
    lambda i, d, lp, fr: {"index": i, "delta": d, "logprobs": lp, "finish_reason": fr},
    st.integers(0, 3), _delta, _logprobs, st.sampled_from([None, "stop", "length"]))
_text_choice = st.builds(lambda i, t: {"index": i, "text": t, "logprobs": None},
                         st.integers(0, 3), _texts)
_usage_values = st.one_of(st.none(), st.builds(
    lambda n, c: {"prompt_tokens": 3, "completion_tokens": n, **({"total_tokens": 9} if c else {})},
    st.integers(-3, 2**40), st.booleans()))


@st.composite
def _openai_chunks(draw: st.DrawFn) -> bytes:
    """One event of an OpenAI-compatible stream as servers write it, in a layout and order the
    scan may or may not decide (then the parser does)."""
    choice = _chat_choice if draw(st.booleans()) else _text_choice
    obj: dict[str, object] = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                              "created": 1764547200, "model": draw(st.text(max_size=8))}
    obj["choices"] = draw(st.lists(choice, max_size=2))
    if draw(st.booleans()):
        obj["usage"] = draw(_usage_values)
    if draw(st.booleans()):
        obj["obfuscation"] = draw(st.text(max_size=6))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    text = json.dumps(obj, separators=separators, ensure_ascii=draw(st.booleans()))
    return b"data: " + text.encode() + b"\n\n"


@st.composite
def _token_streams(draw: st.DrawFn) -> list[bytes]:
    """A stream whose token chunks share every byte but their content (what vLLM sends): the
    template path, interleaved with other chunks."""
    model = draw(st.text(max_size=8))
    contents = draw(st.lists(_texts, min_size=1, max_size=12))
    others = draw(st.lists(_openai_chunks(), max_size=3))
    events = [
        b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 1,
                                "model": model, "choices": [{"index": 0, "delta": {"content": c},
                                "logprobs": None, "finish_reason": None}]},
                               separators=(",", ":")).encode() + b"\n\n"
        for c in contents
    ]
    for other in others:
        events.insert(draw(st.integers(0, len(events))), other)
    return events


def _parsed_only() -> contextlib.AbstractContextManager[object]:
    """The JSON parser reads every chunk event: the reference the byte scan must agree with."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(openai_stream, "quick_count", lambda *a: None))
    stack.enter_context(mock.patch.object(SSEUsageParser, "_learn", lambda self, data: None))
    return stack


def _read(events: list[bytes]) -> tuple[object, ...]:
    parser = SSEUsageParser()
    for event in events:
        parser.feed(event)
    return (parser.counted, parser.usage_total, parser.model, parser.done, parser.malformed,
            parser.by_chunks)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.lists(_openai_chunks(), max_size=8), _token_streams()))
def test_byte_scan_counts_what_the_parser_counts(events: list[bytes]) -> None:
    scanned = _read(events)
    with _parsed_only():
        parsed = _read(events)
    assert scanned == parsed


def _vllm_stream(tokens: int) -> list[bytes]:
    head = ('{"id":"chatcmpl-0","object":"chat.completion.chunk","created":1,"model":"m-v",'
            '"choices":[{"index":0,"delta":')
    tail = ',"logprobs":null,"finish_reason":null}]}'
    events = [head + '{"role":"assistant","content":""}' + tail]
    events += [head + json.dumps({"content": f" t{i}"}, separators=(",", ":")) + tail
               for i in range(tokens)]
    events.append('{"id":"chatcmpl-0","object":"chat.completion.chunk","created":1,'
                  f'"model":"m-v","choices":[],"usage":{{"completion_tokens":{tokens}}}}}')
    return [b"data: " + e.encode() + b"\n\n" for e in [*events, "[DONE]"]]


def test_token_chunks_are_never_parsed() -> None:
    """Only the event that carries a usage figure goes through json.loads."""
    parser = SSEUsageParser()
    with mock.patch.object(openai_stream.json, "loads", wraps=json.loads) as loads:
        counted = sum(parser.feed(event) for event in _vllm_stream(50))
    assert counted == 50 and parser.usage_total == 50 and parser.model == "m-v"
    assert parser.done and loads.call_count == 1


# -- usage figures: one rule for every path ---------------------------------------------

_figures = st.one_of(
    st.integers(-5, 2**31 + 5).map(str),
    st.integers(min_value=2**31 - 3, max_value=10**40).map(str),
    st.floats(allow_nan=False).map(json.dumps),
    st.sampled_from(["1e30", "12.5", "12.0", "-0", "0", "1E2", "2147483647", "2147483648",
                     "1" * 400, "9" * 5000, "true", "false", "null", '"5"', "[5]", '{"n":1}',
                     "-1", "01", "NaN", "Infinity"]),
)


def _expected(figure: str) -> int | None:
    try:
        value = json.loads(figure)
    except ValueError:
        return None
    return value if type(value) is int and 0 <= value <= MAX_USAGE else None


@settings(max_examples=150, deadline=None)
@given(_figures)
def test_usage_figures_read_alike_on_every_path(figure: str) -> None:
    usage = '{"prompt_tokens":2,"completion_tokens":' + figure + "}"
    body = ('{"model":"m","choices":[{"message":{"content":"' + "w" * 3000 + '"}}],"usage":'
            + usage + "}").encode()
    small = JSONUsageParser()
    small.feed(body)
    large = JSONUsageParser(max_buffer=1024)  # past it only the tail is searched
    for i in range(0, len(body), 700):
        large.feed(body[i : i + 700])
    sse = SSEUsageParser()
    sse.feed(b'data: {"choices":[],"usage":' + usage.encode() + b"}\n\n")
    expected = _expected(figure)
    assert small.finish() == large.finish() == sse.usage_total == expected
    if expected is None:
        assert small.malformed == large.malformed == sse.malformed == 1


def test_usage_figures_that_are_not_token_counts() -> None:
    for figure in ("1e30", "12.5", str(10**400), "-1", str(2**31)):
        body = ('{"usage":{"completion_tokens":' + figure + "}}").encode()
        big = b'{"choices":[{"text":"' + b"x" * (MAX_JSON_BYTES + 10) + b'"}],' + body[1:]
        parser = JSONUsageParser()
        parser.feed(big)
        assert parser.finish() is None and parser.malformed == 1, figure
    assert usage_figure(2**31 - 1) == 2**31 - 1 and usage_figure(True) is None


# -- counting many chunks at once (the middleware's batch) -------------------------------------

_RAW_CONTENTS = st.lists(
    st.sampled_from([b"a", b" tok", b"}", b"{", b"\n", b"\r", b"\x00", b'"', b'\\"', b"\\n",
                     b'"},"usage":{"completion_tokens":7', b"data: [DONE]\n\n", b""]),
    max_size=3,
).map(b"".join)


def _compact_chat(content: bytes) -> bytes:
    return (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{"content":"' + content +
            b'"},"logprobs":null,"finish_reason":null}]}\n\n')


@st.composite
def _batched_streams(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    """Token chunks that share every byte but their content, some with raw bytes in place of
    the content that make them anything but a token chunk, chunks that are not token chunks,
    events split across chunks or joined in one; and where the batches end."""
    events = [_compact_chat(b"t%d" % i) for i in range(draw(st.integers(1, 12)))]
    for chunk in draw(st.lists(st.one_of(_RAW_CONTENTS.map(_compact_chat), _openai_chunks()),
                               max_size=5)):
        events.insert(draw(st.integers(1, len(events))), chunk)
    if draw(st.booleans()) and len(events) > 1:  # chunks that do not line up with events
        stream = b"".join(events[1:])
        cuts = sorted(draw(st.sets(st.integers(1, len(stream) - 1), max_size=4)))
        events = [events[0], *(stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)],
                                                            strict=True))]
    events.append(b"data: [DONE]\n\n")
    ends = sorted(draw(st.sets(st.integers(1, len(events)), max_size=6)))
    return events, ends


@settings(max_examples=300, deadline=None)
@given(_batched_streams())
def test_chunks_counted_many_at_once_read_as_one_by_one(
    case: tuple[list[bytes], list[int]],
) -> None:
    """What the response observer does with its batch (SSEUsageParser.feed_many, whenever the
    parser is templated) counts exactly what feeding every chunk does."""
    chunks, ends = case
    one_by_one = _read(chunks)
    parser = SSEUsageParser()
    batch: list[bytes] = []
    for i, chunk in enumerate(chunks, 1):
        if batch or parser.templated:
            batch.append(chunk)
        else:
            parser.feed(chunk)
        if batch and (i in ends or i == len(chunks)):
            parser.feed_many(batch)
            batch = []
    batched = (parser.counted, parser.usage_total, parser.model, parser.done, parser.malformed,
               parser.by_chunks)
    assert batched == one_by_one


def test_a_run_of_template_chunks_is_counted_without_feeding_each() -> None:
    events = [_compact_chat(b"t%d" % i) for i in range(40)]
    parser = SSEUsageParser()
    parser.feed(events[0])
    assert parser.templated
    with mock.patch.object(SSEUsageParser, "feed", side_effect=AssertionError("fed")):
        assert parser.feed_many(events[1:]) == 39
    tricky = [events[1], _compact_chat(b"}"), events[2], _compact_chat(b"a\nb"), events[3]]
    assert parser.feed_many([*tricky, _usage(44), b"data: [DONE]\n\n"]) == 4
    assert parser.counted == 44 and parser.usage_total == 44 and parser.done
