"""SGLang started by its own launcher, as users run it: ``opentelemetry-instrument python -m
sglang.launch_server --model-path MODEL --enable-metrics`` (and ``sglang serve``) with
``PROMETHEUS_MULTIPROC_DIR`` set and ``OTEL_DISCONNECT_METRICS_PATH=``, plus ``--device cpu``
(without it SGLang's device detection, ``get_device()`` in its argument resolution, raises "No
accelerator" here). SGLang's launcher spawns its scheduler and detokenizer processes; only their
targets are fake (tests/engines/sglang_launch.py, sglang_fake.py): the real ones load the model
on a GPU. The real process layout stays: the tokenizer manager in the HTTP process, the package
patching it there on import, the fake scheduler's ready message on the launcher's pipe, outputs
through the detokenizer process, SGLang's warm-up request, its SIGTERM drain and its clean-up of
the processes it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

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
LAUNCHER = Path(__file__).with_name("sglang_launch.py")
pytestmark = pytest.mark.timeout(1800)


class Child(NamedTuple):
    pid: int
    name: str
    start: str  # its start time (/proc/PID/stat field 22): the same PID, the same process


class Launch(NamedTuple):
    proc: Proc
    truth: Path
    children: list[Child]


def _stat(pid: int) -> tuple[str, str, int, str] | None:
    """(name, state, parent, start time) of a process; None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = raw[raw.index("(") + 1 : raw.rindex(")")], raw[raw.rindex(")") + 2 :].split()
    return name, rest[0], int(rest[1]), rest[19]


def _children(parent: int) -> list[Child]:
    """Every living descendant of ``parent``."""
    found: dict[int, tuple[str, int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            found[int(entry)] = (stat[0], stat[2], stat[3])
    tree, todo = [], [parent]
    while todo:
        up = todo.pop()
        for pid, (name, ppid, start) in found.items():
            if ppid == up:
                tree.append(Child(pid, name, start))
                todo.append(pid)
    return tree


def _running(child: Child) -> bool:
    stat = _stat(child.pid)
    return stat is not None and stat[3] == child.start and stat[1] != "Z"


@contextlib.contextmanager
def _launched(env: Path, tmp: Path, mode: str) -> Iterator[Launch]:
    """SGLang through its launcher (``module``: ``python -m sglang.launch_server``, ``serve``:
    ``sglang serve``), 2 token ids per output every 20 ms, 40 at most; once its warm-up request
    ended. After it: every process it started is gone (those left are killed, by PID)."""
    prom = tmp / "prometheus"
    prom.mkdir()
    argv = [
        str(env / "bin" / "opentelemetry-instrument"),
        str(env / "bin" / "python"),
        str(LAUNCHER),
        *(mode, str(tmp), "2", "0.02", "0", "40", "--"),
        *("--model-path", "{model}", "--served-model-name", MODEL, "--port", "{port}"),
        *("--enable-metrics", "--device", "cpu"),
    ]
    extra = {**OTEL, "PROMETHEUS_MULTIPROC_DIR": str(prom), "OTEL_DISCONNECT_METRICS_PATH": ""}
    children: list[Child] = []
    try:
        with started(argv, tmp / f"{mode}.log", "/model_info", env=extra) as proc:
            # SGLang's warm-up: one /generate request once /model_info answers.
            settled(lambda: _metrics(proc), {}, 1, ROUTE)
            children = _children(proc.popen.pid)
            names = sorted(c.name for c in children)
            assert "sglang::schedul" in names and "sglang::detoken" in names, names
            yield Launch(proc, tmp / "truth.json", children)
            # The launcher, stopped by SIGTERM next, drains and exits on its own.
            assert proc.popen.poll() is None, proc.log_text()[-4000:]
        assert proc.popen.returncode == 0, (proc.popen.returncode, proc.log_text()[-4000:])
        wait_for(lambda: not any(_running(c) for c in children), timeout=30)
    finally:
        for child in children:
            if _running(child):
                os.kill(child.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def launched(sglang_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    with _launched(sglang_env, tmp_path_factory.mktemp("sglang-launch"), "module") as launch:
        yield launch


def _metrics(proc: Proc) -> dict[Any, float]:
    return proc.samples("/metrics")


def _post(client: RawClient, rid: str, stream: bool) -> None:
    body = json.dumps(
        {"text": "hi", "rid": rid, "stream": stream, "sampling_params": {"max_new_tokens": 1000}}
    ).encode()
    client.request("POST", ROUTE, body=body, headers={"Content-Type": "application/json"})


def _done(launch: Launch, rid: str) -> dict[str, Any]:
    """The fake scheduler's record of ``rid`` (in its own process: from its file) once ended."""

    def check() -> Any:
        truth = json.loads(launch.truth.read_text()) if launch.truth.exists() else {}
        record = truth.get(rid)
        return record if record and record["ended"] else None

    found: dict[str, Any] = wait_for(check, timeout=30)
    return found


def _settled(launch: Launch, before: dict[Any, float], n: float) -> dict[Any, float]:
    return settled(lambda: _metrics(launch.proc), before, n, ROUTE)


def _tokens(before: dict[Any, float], after: dict[Any, float], kind: str = "") -> float:
    name = f"otel_disconnect_llm_tokens{kind}_total"
    return delta(before, after, name, route=ROUTE, model=MODEL)


def _cut_short(launch: Launch, rid: str) -> None:
    proc = launch.proc
    before = _metrics(proc)
    with RawClient(proc.port) as client:
        _post(client, rid, stream=True)
        client.read_until(b"t11 ")  # 4 outputs, 8 tokens in (SGLang streams the whole text)
        client.close()
    truth = _done(launch, rid)
    after = _settled(launch, before, 1)
    assert truth["aborted_at"] is not None and not truth["finished"]
    assert 8 <= truth["tokens"] < 40
    assert _tokens(before, after) == truth["tokens"]  # exact: 2 token ids per output counted
    disconnects = "otel_disconnect_client_disconnects_total"
    assert delta(before, after, disconnects, route=ROUTE, outcome="cancelled") == 1
    aborted = "otel_disconnect_llm_engine_aborted_tokens_total"
    assert delta(before, after, aborted, model=MODEL, phase="streaming") == truth["tokens"]
    assert_clean_log(proc, after)


def test_stream_cut_short(launched: Launch) -> None:
    _cut_short(launched, "cut")


def test_client_that_stays(launched: Launch) -> None:
    before = _metrics(launched.proc)
    for rid, stream in (("stays-s", True), ("stays-j", False)):
        with RawClient(launched.proc.port) as client:
            _post(client, rid, stream=stream)
            raw = read_response(client)
            if stream:
                assert raw.rstrip().endswith(b"0") and b"data: [DONE]" in raw
            assert b'"completion_tokens":40' in raw
        assert _done(launched, rid)["finished"]
    after = _settled(launched, before, 2)
    assert _tokens(before, after) == 80  # exact, streaming and not
    assert _tokens(before, after, "_after_disconnect") == 0
    assert delta(before, after, "otel_disconnect_llm_engine_aborted_requests_total") == 0
    assert delta(before, after, "otel_disconnect_client_disconnects_total") == 0
    assert_clean_log(launched.proc, after)


def test_one_scrape_shows_sglang_and_the_package(launched: Launch) -> None:
    """SGLang's ``/metrics`` (its multiprocess registry, over ``PROMETHEUS_MULTIPROC_DIR``): the
    package's series beside SGLang's, each counting the same request's 40 tokens."""
    before = _metrics(launched.proc)
    with RawClient(launched.proc.port) as client:
        _post(client, "metered", stream=False)
        read_response(client)
    after = _settled(launched, before, 1)
    assert _tokens(before, after) == 40
    assert delta(before, after, "sglang:generation_tokens_total", model_name=MODEL) == 40
    assert value(after, "python_gc_objects_collected_total") == 0  # SGLang's registry
    files = {p.name for p in (launched.truth.parent / "prometheus").iterdir()}
    assert f"counter_{launched.proc.popen.pid}.db" in files  # the HTTP process's counters
    assert_clean_log(launched.proc, after)


def test_sglang_serve(sglang_env: Path, tmp_path: Path) -> None:
    """``sglang serve`` (the recommended entry point) reaches the same launcher: a stream cut
    short is counted exactly, and the processes it started are gone once it stopped."""
    with _launched(sglang_env, tmp_path, "serve") as launch:
        _cut_short(launch, "serve-cut")
        children = launch.children
    assert not any(_running(c) for c in children)
