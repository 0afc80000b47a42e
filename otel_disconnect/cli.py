"""The ``otel-disconnect`` command. Sub-commands arrive with their issues (SPEC section 10)."""

from __future__ import annotations

import argparse
import sys

from .version import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-disconnect", description=__doc__)
    parser.add_argument("--version", action="version", version=f"otel-disconnect {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
