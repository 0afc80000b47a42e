"""``otel-disconnect demo``: the whole story on one machine, in one command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

PROG = "otel-disconnect demo"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run PostgreSQL, an LLM simulator, an instrumented chat gateway and clients that "
             "hang up; print what happened and write an HTML report",
        description="Starts an embedded PostgreSQL (or uses --database-url), an OpenAI-compatible "
                    "LLM simulator, an instrumented FastAPI chat gateway and clients that "
                    "disconnect at realistic points; shows live figures, serves /metrics, and "
                    "after --duration prints a summary and writes an HTML report.",
    )
    parser.add_argument("--duration", type=float, default=30.0, metavar="SECONDS",
                        help="length of each run (default 30)")
    parser.add_argument("--cancel-on-disconnect", action="store_true",
                        help="then run the same load with cancel_on_disconnect, protect() and "
                             "guard_stream(), and compare side by side")
    parser.add_argument("--database-url", "--dsn", dest="database_url",
                        default=os.environ.get("OTEL_DISCONNECT_DEMO_DATABASE_URL"),
                        metavar="URL", help="postgresql://user:password@host:port/db instead of "
                                            "the embedded PostgreSQL")
    parser.add_argument("--llm-url", metavar="URL",
                        help="an OpenAI-compatible server instead of the built-in simulator")
    parser.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="gateway port, serving /metrics "
                                                               "(default 8000)")
    parser.add_argument("--report", type=Path, default=Path("otel-disconnect-report.html"),
                        metavar="PATH", help="HTML report (default ./otel-disconnect-report.html)")
    parser.add_argument("--no-report", action="store_true", help="write no report")
    parser.add_argument("--client-timeout", type=float, default=None, metavar="SECONDS",
                        help="the timing-out clients' timeout (default 10, at most a quarter "
                             "of the duration)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the clients")
    parser.add_argument("--serve", action="store_true",
                        help="only serve the gateway (needs --database-url and --llm-url; the "
                             "compose stack runs the load generator separately)")
    parser.add_argument("--safe", action="store_true",
                        help="with --serve: the gateway with cancellation, protect() and "
                             "guard_stream()")
    parser.add_argument("--workers", type=int, default=1,
                        help="with --serve: uvicorn worker processes (several: set "
                             "PROMETHEUS_MULTIPROC_DIR, and OTEL_DISCONNECT_REDIS_URL for "
                             "fleet-wide retries)")
    parser.set_defaults(func=run)


def fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from otel_disconnect.tools.demo.runner import DemoError, DemoOptions, run_demo

    if args.duration <= 0:
        return fail("--duration must be positive")
    try:
        if args.serve:
            return serve(args)
        run_demo(DemoOptions(
            duration=args.duration, database_url=args.database_url, llm_url=args.llm_url,
            host=args.host, port=args.port, report=None if args.no_report else args.report,
            cancel_on_disconnect=args.cancel_on_disconnect, client_timeout_s=args.client_timeout,
            seed=args.seed,
        ))
    except DemoError as exc:
        return fail(str(exc))
    except ModuleNotFoundError as exc:
        return fail(f"{exc.name} is missing: pip install 'otel-disconnect[demo]'")
    except OSError as exc:
        return fail(str(exc))
    return 0


def serve(args: argparse.Namespace) -> int:
    """The gateway alone, in the foreground (the compose stack's ``app`` service)."""
    import uvicorn

    from otel_disconnect.tools.demo.app import GatewayConfig, create_app
    from otel_disconnect.tools.demo.runner import DemoError, check_database, check_llm
    from otel_disconnect.tools.demo.serving import check_port

    if not args.database_url or not args.llm_url:
        return fail("--serve needs --database-url (or --dsn) and --llm-url")
    check_port(args.host, args.port)
    check_database(args.database_url)
    try:
        check_llm(args.llm_url)
    except DemoError as exc:  # the simulator may start after us in compose: not fatal
        print(f"{PROG}: warning: {exc}", file=sys.stderr)
    print(f"{PROG}: gateway on http://{args.host}:{args.port}/v1/chat/completions, metrics on "
          f"/metrics", flush=True)
    workers = getattr(args, "workers", 1) or 1
    if workers > 1:
        # Each worker builds its own gateway from these (uvicorn imports a factory per worker).
        os.environ["OTEL_DISCONNECT_DEMO_LLM_URL"] = args.llm_url
        os.environ["OTEL_DISCONNECT_DEMO_DATABASE_URL"] = args.database_url
        os.environ["OTEL_DISCONNECT_DEMO_SAFE"] = "1" if args.safe else ""
        uvicorn.run("otel_disconnect.demo.app:create_app_from_env", factory=True,
                    workers=workers, host=args.host, port=args.port, log_level="warning")
        return 0
    app = create_app(GatewayConfig(llm_url=args.llm_url, database_url=args.database_url,
                                   safe=args.safe))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
