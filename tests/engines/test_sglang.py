"""SGLang's real HTTP server (newest release, .matrix/ environment) under
``opentelemetry-instrument``; only the scheduler and detokenizer are fake (tests/engines/
sglang_server.py, on the other ends of the tokenizer manager's ZMQ sockets), and they record
their ground truth: tokens, their times, the abort.

The first run builds the environment (SGLang 0.5.23 with torch 2.14.1, about 11 GB and 5 minutes
here)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..servers import RawClient, wait_for
from .procs import (
    Proc,
    assert_clean_log,
    delta,
    quiet_otel,
    read_response,
    settled,
    started,
    value,
)
from .sglang_fake import MODEL

ROUTE = "/generate"
OTEL = quiet_otel("sglang")
SERVER = Path(__file__).with_name("sglang_server.py")
pytestmark = pytest.mark.timeout(1800)


def _server(
    env: Path, tmp: Path, name: str, *config: str, plain: bool = False, **extra: str
) -> Any:
    argv = [str(env / "bin" / "python"), str(SERVER), "{port}", *config]
    if not plain:
        argv.insert(0, str(env / "bin" / "opentelemetry-instrument"))
    return started(argv, tmp / f"{name}.log", "/truth", env={**OTEL, **extra})


@pytest.fixture(scope="module")
def two_per_step(sglang_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    # 2 token ids per output, one every 20 ms, no queueing, 40 tokens at most.
    with _server(sglang_env, tmp_path_factory.mktemp("sglang"), "two", "2", "0.02", "0", "40") as p:
        yield p


@pytest.fixture(scope="module")
def queued(sglang_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    # 1 token per output, 30 ms apart, 0.8 s in the waiting queue first, 400 tokens at most.
    tmp = tmp_path_factory.mktemp("sglang")
    with _server(sglang_env, tmp, "one", "1", "0.03", "0.8", "400") as p:
        yield p


def _post(client: RawClient, rid: str, stream: bool) -> None:
    body = json.dumps(
        {"text": "hi", "rid": rid, "stream": stream, "sampling_params": {"max_new_tokens": 1000}}
    ).encode()
    client.request("POST", ROUTE, body=body, headers={"Content-Type": "application/json"})


def _truth(proc: Proc, rid: str) -> dict[str, Any]:
    """The fake scheduler's record of ``rid``; empty until the request has reached it."""
    found: dict[str, Any] = json.loads(proc.get("/truth")).get(rid, {})
    return found


def _done(proc: Proc, rid: str) -> dict[str, Any]:
    def check() -> Any:
        record = json.loads(proc.get("/truth")).get(rid)
        return record if record and record["ended"] else None

    found: dict[str, Any] = wait_for(check, timeout=30)
    return found


def _metrics(proc: Proc) -> dict[Any, float]:
    return proc.samples("/metrics")


def _settled(proc: Proc, before: dict[Any, float], n: float) -> dict[Any, float]:
    """Metrics once ``n`` more requests ended (a cut stream ends 2 s later: SGLang's
    ``StreamingResponse`` has a background task that sleeps 2 s before its own abort check)."""
    return settled(lambda: _metrics(proc), before, n, ROUTE)


def _tokens(before: dict[Any, float], after: dict[Any, float], kind: str = "") -> float:
    name = f"otel_disconnect_llm_tokens{kind}_total"
    return delta(before, after, name, route=ROUTE, model=MODEL)


def _aborted(before: dict[Any, float], after: dict[Any, float], kind: str, **labels: str) -> float:
    name = f"otel_disconnect_llm_engine_aborted_{kind}_total"
    return delta(before, after, name, model=MODEL, **labels)


def _disconnects(before: dict[Any, float], after: dict[Any, float], **labels: str) -> float:
    return delta(before, after, "otel_disconnect_client_disconnects_total", route=ROUTE, **labels)


def _clean_log(proc: Proc) -> None:
    assert_clean_log(proc, _metrics(proc))


def test_stream_cut_short_two_tokens_per_output(two_per_step: Proc) -> None:
    before = _metrics(two_per_step)
    with RawClient(two_per_step.port) as client:
        _post(client, "cut", stream=True)
        client.read_until(b"t11 ")  # 4 outputs, 8 tokens in (SGLang streams the whole text)
        client.close()
    truth = _done(two_per_step, "cut")
    after = _settled(two_per_step, before, 1)
    assert truth["aborted_at"] is not None and not truth["finished"]
    assert 8 <= truth["tokens"] < 40
    assert _tokens(before, after) == truth["tokens"]  # exact: 2 token ids per output counted
    assert _disconnects(before, after, outcome="cancelled", phase="streaming") == 1
    assert _aborted(before, after, "requests", phase="streaming") == 1
    assert _aborted(before, after, "tokens", phase="streaming") == truth["tokens"]
    _clean_log(two_per_step)


def test_client_that_stays_two_tokens_per_output(two_per_step: Proc) -> None:
    before = _metrics(two_per_step)
    for rid, stream in (("stays-s", True), ("stays-j", False)):
        with RawClient(two_per_step.port) as client:
            _post(client, rid, stream=stream)
            raw = read_response(client)
            if stream:
                assert raw.rstrip().endswith(b"0") and b"data: [DONE]" in raw
            assert b'"completion_tokens":40' in raw
    after = _settled(two_per_step, before, 2)
    assert _tokens(before, after) == 80  # exact, streaming and not
    assert _tokens(before, after, "_after_disconnect") == 0
    assert _aborted(before, after, "requests") == 0
    _clean_log(two_per_step)


def test_non_streaming_client_timeout(queued: Proc) -> None:
    before = _metrics(queued)
    with RawClient(queued.port) as client:
        _post(client, "timeout", stream=False)
        # The record appears once the fake scheduler has the request: read it only then.
        wait_for(lambda: _truth(queued, "timeout").get("tokens", 0) >= 10)
        client.close()
        closed = time.time()
    truth = _done(queued, "timeout")
    after = _settled(queued, before, 1)
    assert truth["aborted_at"] is not None and not truth["finished"]
    # SGLang notices the disconnect when its wait for the next output times out (4 s), aborts,
    # and answers a 400 error body: the work stopped all the same.
    assert _disconnects(before, after, outcome="cancelled", phase="before_response") == 1
    assert _tokens(before, after) == truth["tokens"]  # exact, the response body never parsed
    tokens_after = sum(1 for t in truth["times"] if t > closed)
    assert tokens_after > 30  # generated for nobody while SGLang had not noticed
    # Within two outputs (60 ms) of the socket's close: the time the middleware took to see it.
    assert abs(_tokens(before, after, "_after_disconnect") - tokens_after) <= 2
    assert _aborted(before, after, "requests", phase="before_response") == 1
    assert _aborted(before, after, "tokens", phase="before_response") == truth["tokens"]
    _clean_log(queued)


def test_client_leaves_before_the_first_token(queued: Proc) -> None:
    before = _metrics(queued)
    with RawClient(queued.port) as client:
        _post(client, "early", stream=True)
        wait_for(lambda: "early" in json.loads(queued.get("/truth")))
        client.close()
    truth = _done(queued, "early")
    after = _settled(queued, before, 1)
    assert truth["tokens"] == 0 and truth["aborted_at"] is not None
    assert _tokens(before, after) == 0
    assert _aborted(before, after, "requests") == 1  # the scheduler's queued-abort echo
    assert _aborted(before, after, "tokens") == 0
    assert _disconnects(before, after, outcome="cancelled") == 1
    _clean_log(queued)


def test_openai_chat_route_cut_short_and_kept(two_per_step: Proc) -> None:
    chat = "/v1/chat/completions"
    before = _metrics(two_per_step)
    for rid, stream in (("chat-cut", True), ("chat-kept", False)):
        body = {
            "model": MODEL,
            "rid": rid,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }
        with RawClient(two_per_step.port) as client:
            client.request(
                "POST",
                chat,
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            if stream:
                client.read_until(b"t11 ")  # OpenAI chunks carry deltas
                client.close()
            else:
                assert b'"completion_tokens":40' in read_response(client)
    cut, kept = _done(two_per_step, "chat-cut"), _done(two_per_step, "chat-kept")
    after = settled(lambda: _metrics(two_per_step), before, 2, chat)
    assert cut["aborted_at"] is not None and kept["finished"]
    tokens = delta(before, after, "otel_disconnect_llm_tokens_total", route=chat, model=MODEL)
    assert tokens == cut["tokens"] + 40
    assert (
        delta(
            before,
            after,
            "otel_disconnect_client_disconnects_total",
            route=chat,
            outcome="cancelled",
            phase="streaming",
        )
        == 1
    )
    assert _aborted(before, after, "tokens", phase="streaming") == cut["tokens"]
    _clean_log(two_per_step)


def _body(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Status line, headers (date and length masked), body de-chunked with SGLang's timings
    masked."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = [re.sub(rb"^(date|content-length): .*", rb"\1: *", h, flags=re.I) for h in lines[1:]]
    if any(h.lower() == b"transfer-encoding: chunked" for h in lines[1:]):
        plain, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            plain, rest = plain + rest[:n], rest[n + 2 :]
        body = plain
    body = re.sub(rb'"(response_sent_to_client_ts|e2e_latency)":[0-9.e+-]+', rb'"\1":*', body)
    return lines[0], headers, body


def test_responses_identical_with_and_without_the_package(
    sglang_env: Path, two_per_step: Proc, tmp_path: Path
) -> None:
    def fetch(proc: Proc, rid: str, stream: bool) -> bytes:
        with RawClient(proc.port) as client:
            _post(client, rid, stream=stream)
            return read_response(client)

    with _server(sglang_env, tmp_path, "plain", "2", "0.02", "0", "40", plain=True) as plain:
        for stream in (True, False):
            rid = f"same-{stream}"
            assert _body(fetch(plain, rid, stream)) == _body(fetch(two_per_step, rid, stream))


def test_one_scrape_beside_sglangs_own_metrics(sglang_env: Path, tmp_path: Path) -> None:
    """With ``--enable-metrics`` SGLang serves a multiprocess registry at ``/metrics``: with
    ``PROMETHEUS_MULTIPROC_DIR`` set before the launch (prometheus-client is imported by the
    instrumentor before SGLang would set it) and no route of the package's own, that one scrape
    shows both ``sglang:*`` and ``otel_disconnect_*``."""
    prom = tmp_path / "prometheus"
    prom.mkdir()
    config = ("2", "0.02", "0", "40", "--enable-metrics")
    extra = {"PROMETHEUS_MULTIPROC_DIR": str(prom), "OTEL_DISCONNECT_METRICS_PATH": ""}
    with _server(sglang_env, tmp_path, "metrics", *config, **extra) as p:
        with RawClient(p.port) as client:
            _post(client, "metered", stream=False)
            read_response(client)
        samples = wait_for(
            lambda: (
                (s := _metrics(p))
                and value(s, "otel_disconnect_requests_total", route=ROUTE) >= 1
                and s
            ),
            timeout=30,
        )
        assert value(samples, "otel_disconnect_llm_tokens_total", route=ROUTE, model=MODEL) == 40
        assert value(samples, "sglang:generation_tokens_total") == 40
        assert value(samples, "python_gc_objects_collected_total") == 0  # SGLang's registry
        _clean_log(p)


def test_middleware_added_after_the_tokenizer_manager_was_built(
    sglang_env: Path, tmp_path: Path
) -> None:
    """``app.add_middleware`` in a launcher script: SGLang is patched when the middleware is
    built, after its tokenizer manager bound the queued-abort echo into its dispatcher."""
    config = ("1", "0.03", "0.8", "400", "--middleware")
    with _server(sglang_env, tmp_path, "late", *config, plain=True) as late:
        before = _metrics(late)
        with RawClient(late.port) as client:
            _post(client, "late-early", stream=True)
            wait_for(lambda: "late-early" in json.loads(late.get("/truth")))
            client.close()
        with RawClient(late.port) as client:
            _post(client, "late-cut", stream=True)
            client.read_until(b"t9 ")
            client.close()
        early, cut = _done(late, "late-early"), _done(late, "late-cut")
        after = _settled(late, before, 2)
        assert early["tokens"] == 0 and cut["aborted_at"] is not None
        assert _aborted(before, after, "requests") == 2  # the queued one through the echo
        assert _aborted(before, after, "tokens") == cut["tokens"]
        assert _tokens(before, after) == cut["tokens"]
        _clean_log(late)
