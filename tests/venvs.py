"""The cached virtual environments under ``.matrix/`` that the version-matrix and engine tests use.

Each environment is a directory keyed by a digest of what it installs, built on first use and
kept: a ``ready`` marker means it is whole. Three things keep a run from failing on the machine
rather than on the code:

- **Disk.** The engine environments are 1 to 11 GB each, about 33 GB together, more than some CI
  machines have free. Before a build, the free space under ``.matrix/`` is checked against what
  that build needs (measured here, in ``need_gb``); when it is short, ready environments that no
  test is using are removed, least recently used first (a stale digest is the least recent of
  all), until it fits. So a run needs room for its largest environment and the ones in use, not
  for all of them; what would not fit fails before pip starts, with the figures.
- **pip's own copies.** pip runs without its download cache (a second copy of every wheel, about
  a third of the environment again) and unpacks in a temporary directory under ``.matrix/``, on
  the disk that was checked.
- **The network.** A step whose download broke off is run again (pip resumes a wheel itself
  first), at most three times.

A failed build leaves no environment behind, and its pip output in ``.matrix/NAME.build.log``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
GB = 1 << 30

# What pip printed when the download, not the resolution or the install, went wrong.
NETWORK_ERRORS = (
    "incomplete-download",
    "Connection interrupted",
    "ConnectionError",
    "ReadTimeoutError",
    "ProtocolError",
    "Connection reset",
    "Temporary failure in name resolution",
)
ATTEMPTS = 3


def python_for(version: str) -> str | None:
    """The interpreter for a ``3.X`` version: this one, else pyenv's newest, else ``python3.X``."""
    if sys.version_info[:2] == tuple(int(p) for p in version.split(".")):
        return sys.executable
    candidates = sorted(PYENV.glob(f"{version}.*/bin/python"), reverse=True)
    found = [str(c) for c in candidates] + [shutil.which(f"python{version}") or ""]
    return next((f for f in found if f), None)


class BuildError(RuntimeError):
    """An environment could not be built; the message says why (pip's output, or the disk)."""


class Matrix:
    """The environments under one directory, and the disk they share."""

    def __init__(
        self,
        root: Path,
        *,
        disk_free: Callable[[Path], int] | None = None,
        run: Callable[..., subprocess.CompletedProcess[bytes]] = subprocess.run,
    ) -> None:
        self.root = root
        self._disk_free = disk_free or (lambda path: shutil.disk_usage(path).free)
        self._run = run

    def path(self, name: str, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self.root / f"{name}-{digest}"

    @contextmanager
    def using(
        self, name: str, key: str, steps: list[list[str]], *, need_gb: float
    ) -> Iterator[Path]:
        """The environment, built if needed, held so that no build removes it meanwhile.

        Held by a shared ``flock`` on its lock file, so two test runs on one ``.matrix/`` (git
        worktrees linking it) see each other's holds; one builds while the other waits."""
        venv = self.path(name, key)
        with self._lock(venv) as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            if (venv / "ready").exists():
                (venv / "ready").touch()  # the least recently used goes first on a short disk
            else:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait for it
                if not (venv / "ready").exists():
                    self._build(name, venv, steps, need_gb)
                fcntl.flock(lock, fcntl.LOCK_SH)
            yield venv

    @contextmanager
    def _lock(self, venv: Path) -> Iterator[int]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{venv.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _build(self, name: str, venv: Path, steps: list[list[str]], need_gb: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(venv, ignore_errors=True)
        removed = self.make_room(need_gb, building=venv.name)
        log = self.root / f"{name}.build.log"
        tmp = self.root / ".tmp" / venv.name
        env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "TMPDIR": str(tmp)}
        env = {k: v for k, v in env.items() if not k.startswith("PYTEST_")}
        try:
            with log.open("w") as out:
                for gone in removed:
                    out.write(f"# removed the idle environment {gone} to make room\n")
                for step in steps:
                    self._step([p.replace("{venv}", str(venv)) for p in step], out, log, env, tmp)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)  # half an environment is only a disk cost
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        (venv / "ready").write_text("ok\n")

    def _step(
        self, step: list[str], out: IO[str], log: Path, env: dict[str, str], tmp: Path
    ) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            tmp.mkdir(parents=True, exist_ok=True)
            start = log.stat().st_size
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            done = self._run(step, stdout=out, stderr=subprocess.STDOUT, env=env)
            if done.returncode == 0:
                return
            with log.open("rb") as f:
                f.seek(start)
                printed = f.read().decode(errors="replace")
            if attempt < ATTEMPTS and any(e in printed for e in NETWORK_ERRORS):
                shutil.rmtree(tmp, ignore_errors=True)
                time.sleep(5 * attempt)  # a registry that dropped the connection, given a moment
                continue
            raise BuildError(f"building failed ({' '.join(step)}), see {log}:\n{printed[-4000:]}")

    def make_room(self, need_gb: float, *, building: str) -> list[str]:
        """Free ``need_gb`` under the root by removing idle environments, oldest use first;
        the names of those removed."""
        need = int(need_gb * GB)
        free = self._disk_free(self.root)
        if free >= need:
            return []
        removed: list[str] = []
        held: list[str] = []
        for candidate in self._oldest_first(building):
            with self._lock(candidate) as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.append(candidate.name)  # a test, here or in another run, is using it
                    continue
                shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate.name)
            free = self._disk_free(self.root)
            if free >= need:
                return removed
        raise BuildError(
            f"building {building} needs about {need_gb:.0f} GB free under {self.root}; "
            f"{free / GB:.1f} GB is free after removing {len(removed)} idle environment(s) "
            f"({', '.join(removed) or 'none'}); in use: {', '.join(sorted(held)) or 'none'}"
        )

    def _oldest_first(self, building: str) -> list[Path]:
        found = []
        for entry in self.root.iterdir():
            if not entry.is_dir() or entry.name.startswith(".") or entry.name == building:
                continue
            marker = entry / "ready"
            # A directory with no marker is a build that was killed: older than anything.
            used = marker.stat().st_mtime if marker.exists() else 0.0
            found.append((used, entry.name, entry))
        return [entry for _used, _name, entry in sorted(found)]


MATRIX = Matrix(ROOT / ".matrix")


def pip_steps(python: str, installs: list[list[str]]) -> list[list[str]]:
    """Make the venv, bring its pip up to date, then each install (``{venv}`` is the directory)."""
    pip = [
        "{venv}/bin/python",
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--retries",
        "10",
        "--resume-retries",
        "10",
    ]
    upgrade = ["{venv}/bin/python", "-m", "pip", "install", "--disable-pip-version-check"]
    return [
        [python, "-m", "venv", "{venv}"],
        [*upgrade, "--upgrade", "pip"],
        *([*pip, *install] for install in installs),
    ]
