"""``otel-disconnect generate [ROOT]``: regenerate the repository's dashboards, alert rules,
Grafana provisioning, Kubernetes manifests and mixin from ``otel_disconnect.tools.ops``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="regenerate dashboards, rules and provisioning in a checkout",
        description=__doc__,
    )
    p.add_argument("root", nargs="?", type=Path, default=Path.cwd(),
                   help="repository root (default: the current directory)")
    p.set_defaults(func=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from otel_disconnect.tools.ops.generate import write

    if not (args.root / "pyproject.toml").is_file():
        args.parser.error(f"{args.root} is not the repository root (no pyproject.toml)")
    for path in write(args.root):
        print(f"wrote {path}")
    return 0
