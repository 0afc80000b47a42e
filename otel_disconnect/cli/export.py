"""``otel-disconnect export DIR``: the dashboards, alert rules and Grafana provisioning shipped in
the package, written to DIR for import or mounting."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; importlib.abc has it on 3.10 too
    from importlib.abc import Traversable

ASSETS = ("otel_disconnect.ops", "assets")


def _walk(node: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    found: list[tuple[str, Traversable]] = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            found.extend(_walk(child, rel + "/"))
        elif not child.name.startswith(".") and not child.name.endswith((".py", ".pyc")):
            found.append((rel, child))
    return found


def shipped_files() -> list[tuple[str, Traversable]]:
    """(relative path, resource) of every shipped file, sorted."""
    package, folder = ASSETS
    return _walk(resources.files(package).joinpath(folder))


def export(target: Path, *, force: bool = False) -> list[Path]:
    files = shipped_files()
    if not files:
        raise RuntimeError("no shipped files found: the package is incomplete")
    clashes = [rel for rel, _ in files if (target / rel).exists()]
    if clashes and not force:
        raise FileExistsError(
            f"{len(clashes)} file(s) exist in {target} (e.g. {clashes[0]}); use --force"
        )
    written = []
    for rel, resource in files:
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(resource.read_bytes())
        written.append(path)
    return written


def _run(args: argparse.Namespace) -> int:
    try:
        written = export(Path(args.dir), force=args.force)
    except (FileExistsError, RuntimeError) as exc:
        print(f"otel-disconnect export: {exc}")
        return 1
    for path in written:
        print(path)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write the Grafana dashboards, Prometheus alert rules and Grafana provisioning",
        description=__doc__,
    )
    parser.add_argument("dir", metavar="DIR", help="target directory (created if missing)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.set_defaults(func=_run)
