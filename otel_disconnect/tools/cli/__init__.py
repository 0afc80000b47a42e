"""The ``otel-disconnect`` command: the one entry point of every tool.

Each sub-command is a module here with ``register(subparsers)``; that function adds its parser
and sets ``func(args) -> int`` as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from otel_disconnect.version import __version__

SUBCOMMANDS = (
    "demo", "probe", "export", "pg_exporter", "sim", "generate", "webhook", "loadgen",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-disconnect",
        description="Make HTTP client disconnects visible and safe in ASGI services.",
    )
    parser.add_argument("--version", action="version", version=f"otel-disconnect {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
