"""``otel-disconnect loadgen --url http://app:8000``: the demo's clients (streaming users who
leave, clients that time out and retry) against a running demo gateway, as the compose stack
runs them."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "loadgen", help="drive a running demo gateway with the demo's clients",
        description=__doc__,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the demo gateway")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until Ctrl-C)")
    p.add_argument("--client-timeout", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otel_disconnect.tools.demo.loadgen import main

    return main(args)
