"""Run Starlette's and FastAPI's own test suites with DisconnectMiddleware around every app.

    python bench/peer_suites.py                 # both suites, the installed versions
    python bench/peer_suites.py --suite starlette -- -k middleware   # extra pytest arguments

For each peer it takes the version installed here, downloads that version's sdist
(``pip download --no-binary :all: --no-deps``), builds one virtual environment under
``.peer_suites/`` with the peer, its test dependencies and this package, and runs the suite twice
in it: once as it is (the baseline) and once with ``bench/peer_plugin.py`` wrapping every
Starlette/FastAPI app in the middleware and auditing every HTTP request (the app got the
server's messages in order; the server got exactly what the app sent). It reports the tests whose
outcome changed for the worse and every audit finding, and exits 1 if there is any.

The first run downloads and installs (a few minutes); each suite then takes minutes on two cores.
Tests that cannot run here (a test dependency missing from the index) fail or are skipped the
same way in both runs and so never count as regressions; the report gives their number.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".peer_suites"
SUITES = ("starlette", "fastapi")

# Test dependencies left out: linters, type checkers, coverage and benchmark plugins, parallel
# runners and output prettifiers change nothing about what the tests check.
_SKIP = {"mypy", "ruff", "ty", "coverage", "pytest-codspeed", "pytest-cov", "pytest-sugar",
         "pytest-xdist", "twine", "prek", "zizmor", "playwright"}
GOOD = ("passed", "xfailed", "skipped")


def _requirements(project: Path, suite: str) -> list[str]:
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    groups = meta.get("dependency-groups", {})

    def expand(name: str) -> list[str]:
        out: list[str] = []
        for entry in groups.get(name, []):
            if isinstance(entry, dict):
                out += expand(entry["include-group"])
            else:
                out.append(entry)
        return out

    wanted = expand("dev" if suite == "starlette" else "tests")
    def name(requirement: str) -> str:
        return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower()

    return [r for r in wanted if name(r) not in _SKIP and not name(r).startswith("types-")]


def _sdist(suite: str, version: str) -> Path:
    project = CACHE / f"{suite}-{version}"
    if project.is_dir():
        return project
    CACHE.mkdir(exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"{suite}=={version}",
            "-d",
            str(CACHE),
        ],
        check=True,
    )
    archive = next(CACHE.glob(f"{suite}-{version}.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE, filter="data")
    return project


def _venv(suite: str, version: str, project: Path) -> Path:
    # The extras the suites' own CI installs (python-multipart, email-validator, jinja2, ...).
    extra = "full" if suite == "starlette" else "all"
    requirements = [f"{suite}[{extra}]=={version}", *_requirements(project, suite)]
    if suite == "fastapi":
        requirements.append(f"starlette=={importlib.metadata.version('starlette')}")
    key = hashlib.sha256(json.dumps(requirements).encode()).hexdigest()[:10]
    venv = CACHE / f"venv-{suite}-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-e", str(ROOT)], check=True)
    if subprocess.run([*pip, *requirements], check=False).returncode != 0:
        # One unavailable test dependency must not cost the others: install them one by one.
        for requirement in requirements:
            if subprocess.run([*pip, requirement], check=False).returncode != 0:
                print(
                    f"peer_suites: could not install {requirement!r}; its tests will not run",
                    file=sys.stderr,
                )
    (venv / ".complete").write_text("\n".join(requirements))
    return python


def _run(python: Path, project: Path, wrap: bool, extra: list[str]) -> dict[str, object]:
    results = CACHE / f"{project.name}-{'wrapped' if wrap else 'baseline'}.json"
    env = {
        **os.environ,
        "PEER_RESULTS": str(results),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(project)]),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PEER_WRAP"] = "1" if wrap else "0"
    started = time.monotonic()
    subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            "-p",
            "peer_plugin",
            "-p",
            "no:cacheprovider",
            "--continue-on-collection-errors",
            "-q",
            "--no-header",
            "-o",
            "console_output_style=classic",
            *extra,
        ],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        check=False,  # failing tests are the data, compared below
    )
    data: dict[str, object] = json.loads(results.read_text())
    data["seconds"] = time.monotonic() - started
    return data


def _compare(suite: str, version: str, base: dict[str, object], wrapped: dict[str, object]) -> int:
    before: dict[str, str] = base["outcomes"]  # type: ignore[assignment]
    after: dict[str, str] = wrapped["outcomes"]  # type: ignore[assignment]
    audit: list[dict[str, object]] = wrapped["audit"]  # type: ignore[assignment]
    regressed = sorted(
        t
        for t, o in before.items()
        if o in GOOD
        and after.get(t, "missing") != o
        and not (o == "skipped" and after.get(t) == "passed")
    )

    def count(outcomes: dict[str, str], kind: str) -> int:
        return sum(1 for o in outcomes.values() if o == kind)

    print(
        f"\n{suite} {version}: {len(before)} tests; baseline passed {count(before, 'passed')}, "
        f"failed {count(before, 'failed')}, skipped {count(before, 'skipped')}, "
        f"other {sum(1 for o in before.values() if o not in (*GOOD, 'failed'))} "
        f"({base['seconds']:.0f} s); wrapped passed {count(after, 'passed')}, failed "
        f"{count(after, 'failed')} ({wrapped['seconds']:.0f} s)"
    )
    print(
        f"  requests audited: {wrapped['requests']} ({wrapped['asyncio_requests']} on asyncio, "
        f"the rest on trio, passed through); audit findings: {len(audit)}; "
        f"regressions: {len(regressed)}"
    )
    for test in regressed:
        print(f"  REGRESSED {test}: {before[test]} -> {after.get(test, 'missing')}")
    for finding in audit[:50]:
        print(f"  AUDIT {finding['test']} {finding['path']}: {finding['problem']}")
        for key in ("server_gave", "app_got", "server_got", "app_sent"):
            print(f"      {key}: {finding[key]}")
    return len(regressed) + len(audit)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=SUITES, action="append")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()
    problems = 0
    for suite in args.suite or SUITES:
        version = importlib.metadata.version(suite)
        project = _sdist(suite, version)
        python = _venv(suite, version, project)
        base = _run(python, project, False, args.pytest_args)
        wrapped = _run(python, project, True, args.pytest_args)
        problems += _compare(suite, version, base, wrapped)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
