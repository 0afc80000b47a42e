"""The cached environments under ``.matrix/`` (tests/venvs.py): built once, kept, and on a short
disk the idle ones go, least recently used first, so a run needs room for what it uses at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .venvs import GB, BuildError, Matrix


class Disk:
    """A disk of ``capacity`` GB on which every environment weighs what its ``size`` file says."""

    def __init__(self, root: Path, capacity: float) -> None:
        self.root = root
        self.capacity = capacity

    def free(self, _path: Path) -> int:
        used = sum(float(p.read_text()) for p in self.root.glob("*/size"))
        return int((self.capacity - used) * GB)


class Pip:
    """Stands in for the build commands: records them, makes the environment ``gb`` big, and
    prints and fails as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        self.fail_with: list[str] = []  # printed by the next failing calls, one each

    def __call__(self, step: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        env = kwargs["env"]
        self.calls.append((step, env))
        assert Path(env["TMPDIR"]).is_dir()  # pip unpacks on the checked disk
        if self.fail_with:
            kwargs["stdout"].write(self.fail_with.pop(0))
            kwargs["stdout"].flush()  # as a child process writes: straight to the file
            return subprocess.CompletedProcess(step, 1)
        venv, gb = Path(step[0]), step[1]
        venv.mkdir(parents=True, exist_ok=True)
        (venv / "size").write_text(gb)
        return subprocess.CompletedProcess(step, 0)


def steps(gb: float) -> list[list[str]]:
    return [["{venv}", str(gb)]]


@pytest.fixture
def matrix(tmp_path: Path) -> tuple[Matrix, Disk, Pip]:
    disk, pip = Disk(tmp_path / "m", capacity=30), Pip()
    return Matrix(tmp_path / "m", disk_free=disk.free, run=pip), disk, pip


def use(m: Matrix, name: str, gb: float) -> Path:
    with m.using(name, name, steps(gb), need_gb=gb + 1) as venv:
        assert (venv / "ready").exists()
        return venv


def age(venv: Path, seconds: float) -> None:
    stamp = (venv / "ready").stat().st_mtime - seconds
    os.utime(venv / "ready", (stamp, stamp))


def test_built_once_then_kept(matrix: tuple[Matrix, Disk, Pip]) -> None:
    m, _disk, pip = matrix
    first = use(m, "a", 2)
    assert use(m, "a", 2) == first
    assert len(pip.calls) == 1
    step, env = pip.calls[0]
    assert step[0] == str(first)  # {venv} is the environment's directory
    assert env["PIP_NO_CACHE_DIR"] == "1"
    assert not any(k.startswith("PYTEST_") for k in env)
    assert not (m.root / ".tmp" / first.name).exists()


def test_a_short_disk_removes_idle_environments_least_recently_used_first(
    matrix: tuple[Matrix, Disk, Pip],
) -> None:
    m, _disk, _pip = matrix
    old, recent, newest = use(m, "old", 10), use(m, "recent", 10), use(m, "newest", 5)
    age(old, 300)
    age(recent, 200)
    age(newest, 100)
    use(m, "old", 10)  # used again: now the most recent
    # 5 GB free; a 14 GB build needs 15: "recent" (10 GB) is enough to free.
    big = use(m, "big", 14)
    assert not recent.exists()
    assert old.exists() and newest.exists() and big.exists()
    assert f"removed the idle environment {recent.name}" in (m.root / "big.build.log").read_text()


def test_a_stale_or_killed_build_goes_before_any_ready_environment(
    matrix: tuple[Matrix, Disk, Pip],
) -> None:
    m, _disk, _pip = matrix
    ready = use(m, "ready", 10)
    age(ready, 1000)
    killed = m.root / "killed-0123456789ab"
    killed.mkdir()
    (killed / "size").write_text("10")  # no ready marker: a build that never finished
    use(m, "new", 15)  # 10 free, needs 16: the killed build's 10 GB is enough
    assert not killed.exists() and ready.exists()


def test_an_environment_in_use_is_never_removed(matrix: tuple[Matrix, Disk, Pip]) -> None:
    m, _disk, pip = matrix
    with m.using("held", "held", steps(20), need_gb=21) as held:
        with pytest.raises(BuildError) as caught:
            use(m, "other", 15)
        assert held.exists()
    message = str(caught.value)
    assert "needs about 16 GB" in message and "10.0 GB is free" in message
    assert "in use: held-" in message
    assert not m.path("other", "other").exists()
    assert len(pip.calls) == 1  # nothing ran for the build that could not fit
    # Released, it is idle, and the same build now fits.
    assert use(m, "other", 15).exists()
    assert not held.exists()


def test_a_failed_build_leaves_its_log_and_no_environment(matrix: tuple[Matrix, Disk, Pip]) -> None:
    m, _disk, pip = matrix
    pip.fail_with = ["ERROR: No matching distribution found for vllm==99\n"]
    with pytest.raises(BuildError, match="No matching distribution found for vllm==99"):
        use(m, "a", 2)
    assert len(pip.calls) == 1  # not a network error: not run again
    assert not m.path("a", "a").exists()
    assert "vllm==99" in (m.root / "a.build.log").read_text()


def test_a_broken_download_is_run_again(
    matrix: tuple[Matrix, Disk, Pip], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tests.venvs.time.sleep", lambda _s: None)
    m, _disk, pip = matrix
    pip.fail_with = ["error: incomplete-download\n", "WARNING: Connection interrupted\n"]
    assert use(m, "a", 2).exists()
    assert len(pip.calls) == 3
    pip.fail_with = ["error: incomplete-download\n"] * 3
    with pytest.raises(BuildError, match="incomplete-download"):
        use(m, "b", 2)
    assert len(pip.calls) == 6  # three attempts, then the error


def test_a_real_build_with_the_real_commands(tmp_path: Path) -> None:
    m = Matrix(tmp_path / "m")
    built = [[sys.executable, "-m", "venv", "--without-pip", "{venv}"]]
    with m.using("real", "real", built, need_gb=0.1) as venv:
        python = venv / "bin" / "python"
        out = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True)
        assert out.stdout.decode().strip() == str(venv)
    assert "$ " in (m.root / "real.build.log").read_text()


def test_a_ready_environment_can_be_held_twice(matrix: tuple[Matrix, Disk, Pip]) -> None:
    m, _disk, pip = matrix
    use(m, "a", 2)
    with m.using("a", "a", steps(2), need_gb=3) as outer:
        assert use(m, "a", 2) == outer  # shared holds: no wait on itself
    assert len(pip.calls) == 1


def test_an_environment_another_run_holds_is_never_removed(
    matrix: tuple[Matrix, Disk, Pip],
) -> None:
    """Two test runs on one .matrix/ (git worktrees linking it) see each other's holds."""
    m, _disk, _pip = matrix
    held = use(m, "held", 20)
    holder = (
        "import sys; from pathlib import Path; from tests.venvs import Matrix\n"
        f"with Matrix(Path({str(m.root)!r})).using('held', 'held', [], need_gb=0):\n"
        "    print('holding', flush=True); sys.stdin.read()\n"
    )
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", holder], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"holding\n"
        with pytest.raises(BuildError, match="in use: held-"):
            use(m, "other", 15)
        assert held.exists()
    finally:
        child.communicate(timeout=60)
    assert use(m, "other", 15).exists() and not held.exists()
