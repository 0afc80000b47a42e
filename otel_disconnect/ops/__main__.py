"""``python -m otel_disconnect.ops [ROOT]``: regenerate dashboards, rules and provisioning."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .generate import write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m otel_disconnect.ops", description=__doc__)
    parser.add_argument("root", nargs="?", type=Path, default=Path.cwd(),
                        help="repository root (default: the current directory)")
    args = parser.parse_args(argv)
    if not (args.root / "pyproject.toml").is_file():
        parser.error(f"{args.root} is not the repository root (no pyproject.toml)")
    for path in write(args.root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
