"""``otel-disconnect probe URL``: hang up on a running service and read what it did after."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PROG = "otel-disconnect probe"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        help="black-box check of a running service: disconnect at chosen points and read its "
             "/metrics to see what it did after",
        description="Reads URL's /metrics, disconnects during the request body, before the "
                    "response and mid-stream, reads /metrics again and reports, per kind of "
                    "disconnect, whether the service detected it, cancelled the work, and how "
                    "much work and how many LLM tokens went on after. Exits 1 when a disconnect "
                    "went unseen (a reverse proxy that hides client aborts, or no middleware).",
    )
    parser.add_argument("url", metavar="URL", help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--path", default="/v1/chat/completions",
                        help="endpoint to call (default /v1/chat/completions)")
    parser.add_argument("--method", default="POST", help="HTTP method (default POST)")
    parser.add_argument("--body", default=None, metavar="JSON",
                        help="request body (default: a small OpenAI chat request; streaming "
                             "requests get \"stream\": true)")
    parser.add_argument("--metrics-url", default=None, metavar="URL",
                        help="where the service's Prometheus metrics are (default URL/metrics)")
    parser.add_argument("--count", type=int, default=3, help="disconnects per kind (default 3)")
    parser.add_argument("--delay", type=float, default=0.2, metavar="SECONDS",
                        help="how long the probe waits before hanging up (default 0.2)")
    parser.add_argument("--wait", type=float, default=15.0, metavar="SECONDS",
                        help="how long to wait for the service to record them (default 15)")
    parser.add_argument("--kinds", default="request_body,before_response,streaming",
                        help="comma-separated subset of request_body,before_response,streaming")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otel_disconnect.tools.probe import KINDS, NoMiddleware, ProbeError, Prober

    def fail(message: str, code: int = 2) -> int:
        print(f"{PROG}: {message}", file=sys.stderr)
        return code

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        return fail(f"unknown --kinds {','.join(unknown) or '(none)'}; choose from "
                    f"{','.join(KINDS)}")
    body = None
    if args.body is not None:
        try:
            json.loads(args.body)
        except ValueError as exc:
            return fail(f"--body is not JSON: {exc}")
        body = args.body.encode()
    try:
        prober = Prober(args.url, path=args.path, method=args.method, body=body,
                        metrics_url=args.metrics_url, count=max(1, args.count),
                        delay_s=args.delay, settle_s=args.wait, kinds=kinds)
        print(f"{PROG}: {args.url}{args.path}, metrics {prober.metrics_url}", flush=True)
        report = prober.run(progress=lambda line: print(f"{PROG}: {line}", flush=True))
    except NoMiddleware as exc:
        return fail(str(exc), code=1)
    except ProbeError as exc:
        return fail(str(exc))
    except ValueError as exc:
        return fail(str(exc))
    print(report.text())
    if report.proxy:
        print(f"{PROG}: responses came through {report.proxy} (its Server/Via header)")
    for line in report.advice():
        print(f"{PROG}: look at {line}")
    if report.caused == 0:
        return fail("the service answered every request before the probe hung up: try a "
                    "slower endpoint, --path, or a smaller --delay", code=1)
    if not report.ok:
        where = f"{report.proxy} " if report.proxy else "a reverse proxy "
        return fail(f"{report.undetected} of {report.caused} disconnects went undetected: "
                    f"{where}may be holding on to the upstream request after the client left "
                    "(see the advice above and the README's proxy table)", code=1)
    held = report.caused - report.detected
    if held:
        print(f"{PROG}: every disconnect that reached the service was detected "
              f"({report.detected}; {held} never reached it)")
    else:
        print(f"{PROG}: every disconnect was detected ({report.detected} of {report.caused})")
    return 0
