"""``otel-disconnect pg-exporter``: PgActivityCollector as a standalone Prometheus exporter."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

DEFAULT_PORT = 9188


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "pg-exporter",
        help="export pg_stat_activity (idle in transaction, transaction ages) to Prometheus",
        description="Serve the otel_disconnect_pg_* gauges over HTTP. "
                    "The role needs only pg_monitor.",
    )
    parser.add_argument(
        "--dsn", default=os.environ.get("OTEL_DISCONNECT_PG_DSN") or os.environ.get("DATABASE_URL"),
        help="libpq connection string or postgresql:// URL (default: $OTEL_DISCONNECT_PG_DSN, "
             "then $DATABASE_URL)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default 9188)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument(
        "--statement-timeout", type=float, default=2.0, metavar="SECONDS",
        help="server-side bound on each scrape's query (default 2)",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("OTEL_DISCONNECT_REDIS_URL") or None,
        help="the fleet's Redis (default: $OTEL_DISCONNECT_REDIS_URL): export the orphaned "
             "transactions every process of the fleet reports",
    )
    parser.add_argument(
        "--fleet", default=os.environ.get("OTEL_DISCONNECT_FLEET") or "default",
        help="the fleet name the apps use (default: $OTEL_DISCONNECT_FLEET, then 'default')",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from otel_disconnect.db.pg_activity import PgActivityCollector

    if not args.dsn:
        print("otel-disconnect pg-exporter: --dsn is required (or set OTEL_DISCONNECT_PG_DSN)")
        return 2
    registry = CollectorRegistry()
    redis_url = getattr(args, "redis_url", None)
    reader = None
    if redis_url:
        from otel_disconnect.config import Config
        from otel_disconnect.fleet.reader import ClaimsReader

        try:
            Config.from_options(redis_url=redis_url, fleet=getattr(args, "fleet", None))
        except ValueError as exc:
            print(f"otel-disconnect pg-exporter: --redis-url / --fleet: {exc}")
            return 2
        reader = ClaimsReader(redis_url, args.fleet or "default", registry)
    collector = PgActivityCollector(
        args.dsn, registry=registry, statement_timeout_s=args.statement_timeout,
        application_name="otel-disconnect-pg-exporter",
        # No pool lives in this process: orphans are known only from the fleet's events.
        orphans=False, claims=reader.claims if reader is not None else None,
    )
    server, thread = start_http_server(args.port, addr=args.host, registry=registry)
    url = f"http://{args.host}:{args.port}/metrics"
    print(f"otel-disconnect pg-exporter: serving {url}", flush=True)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        thread.join(timeout=5)
        collector.close()
        if reader is not None:
            reader.stop()
    return 0
