"""``otel-disconnect export DIR``: the dashboards, alert rules and Grafana provisioning shipped in
the package, written to DIR for import or mounting."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; importlib.abc has it on 3.10 too
    from importlib.abc import Traversable

ASSETS = ("otel_disconnect.tools.ops", "assets")


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


def export_prometheus_operator(
    target: Path,
    *,
    namespace: str | None = None,
    labels: dict[str, str] | None = None,
    force: bool = False,
) -> list[Path]:
    """A PrometheusRule and one ConfigMap per dashboard, for ``kubectl apply -f target``."""
    from otel_disconnect.tools.ops.kubernetes import manifests

    files = manifests(namespace, labels)
    clashes = [name for name in files if (target / name).exists()]
    if clashes and not force:
        raise FileExistsError(
            f"{len(clashes)} file(s) exist in {target} (e.g. {clashes[0]}); use --force"
        )
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (target / name).write_text(text, encoding="utf-8")
        written.append(target / name)
    return written


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _run(args: argparse.Namespace) -> int:
    try:
        if args.format == "prometheus-operator":
            written = export_prometheus_operator(
                Path(args.dir),
                namespace=args.namespace,
                labels=_labels(args.label),
                force=args.force,
            )
        else:
            written = export(Path(args.dir), force=args.force)
    except (FileExistsError, RuntimeError, ValueError) as exc:
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
    parser.add_argument(
        "--format",
        choices=("files", "prometheus-operator"),
        default="files",
        help="files: dashboards, rules and provisioning as plain files (default); "
        "prometheus-operator: a PrometheusRule and the dashboards as ConfigMaps labelled "
        "grafana_dashboard=1 for Grafana's sidecar, for kubectl apply -f DIR",
    )
    parser.add_argument(
        "--namespace",
        default=None,
        help="metadata.namespace of the Kubernetes objects (default: none, "
        "kubectl's current namespace)",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra label on every object, e.g. release=prometheus for the "
        "operator's ruleSelector (repeatable)",
    )
    parser.set_defaults(func=_run)
