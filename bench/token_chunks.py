"""The marginal cost of counting one more token chunk, in instructions (callgrind).

The response token observer alone, in-process, fed as the middleware feeds it (its batch when
it offers one): responses of the /chat stream of benchapp.py
(vLLM's chunk layout) with ``--short`` and ``--long`` token chunks each, ``--requests`` of them
after a warm-up, each count in its own process under callgrind; the difference divided by the
extra chunks is what one more streamed token chunk costs, free of the per-request work.

Usage: ``python bench/token_chunks.py [--short 10 --long 110 --requests 300]`` (needs valgrind).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARMUP = 200


def _run(requests: int, chunks: int) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from benchapp import _CHAT

    from otel_disconnect.llm import response_tokens
    from otel_disconnect.llm.response_tokens import observer_for
    from otel_disconnect.state import RequestState

    batch_chunks = getattr(response_tokens, "BATCH_CHUNKS", 0)

    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]}
    body = [*(_CHAT * (chunks // len(_CHAT) + 1))[:chunks], b"data: [DONE]\n\n"]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    for _ in range(requests):
        state = RequestState(scope)
        observer = observer_for(state, start)
        for chunk in body:
            if observer is None:
                continue
            # What the middleware does: a chunk goes to the observer's batch when it offers one
            # (versions without one feed every chunk).
            batch = getattr(observer, "batch", None)
            if batch is not None:
                batch.append(chunk)
                if len(batch) >= batch_chunks:
                    observer.flush(state)
            else:
                observer = observer.feed(state, chunk, True, False)
        if observer is not None:
            observer.feed(state, b"", True, True)  # the final body


def _count(requests: int, chunks: int) -> int:
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--drive", str(requests), str(chunks)],
        capture_output=True, text=True, check=True,
    )
    found = re.search(r"Collected : (\d+)", result.stderr)
    assert found, result.stderr[-2000:]
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=110)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--drive", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        _run(WARMUP, args.drive[1])
        _run(*args.drive)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    short, long = _count(args.requests, args.short), _count(args.requests, args.long)
    per_chunk = (long - short) / ((args.requests + WARMUP) * (args.long - args.short))
    print(f"instructions per additional token chunk: {per_chunk:,.0f}")


if __name__ == "__main__":
    main()
