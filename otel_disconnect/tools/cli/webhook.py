"""``otel-disconnect webhook --port 9099``: an Alertmanager webhook receiver that prints one
JSON line per alert (``otel_disconnect.tools.ops.webhook``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "webhook", help="print the alerts Alertmanager sends, one JSON line each",
        description=__doc__,
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9099)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otel_disconnect.tools.ops.webhook import AlertLog

    log = AlertLog(args.host, args.port, out=sys.stdout)
    try:
        log.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        log.server.server_close()
    return 0
