"""The library apart from its tools: no module of the installed library imports
``otel_disconnect.tools`` (the CLI, demo, simulator, probe, dashboard generators), so an app that
adds the middleware loads none of that code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "otel_disconnect"


def _library_modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts
        if parts[1:2] == ("tools",) or parts[-1] == "__main__":
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def _imports(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def test_no_library_module_imports_the_tools() -> None:
    modules = _library_modules()
    assert len(modules) > 30
    offenders = {
        name: sorted(i for i in _imports(path, name) if i.startswith("otel_disconnect.tools"))
        for name, path in modules
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_importing_the_library_loads_no_tool() -> None:
    """Every library module imported in a fresh interpreter: still no tools module loaded."""
    names = [name for name, _ in _library_modules()]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"  # an optional extra that is not installed
        "        print('skipped', name, exc, file=sys.stderr)\n"
        "print(sorted(m for m in sys.modules if m.startswith('otel_disconnect.tools')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_one_command_line_entry_point() -> None:
    """Every tool is a sub-command of ``otel-disconnect``; no module has its own argparse main."""
    mains = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "argparse.ArgumentParser(" in path.read_text(encoding="utf-8")
    ]
    assert mains == ["tools/cli/__init__.py"], mains
