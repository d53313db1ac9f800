"""Ports, answers and the API as a child process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from service.api.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
SERVE = str(Path(sys.executable).parent / "visrec-serve")  # the installed entry point


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The process ids of a process's children (e.g. ``visrec-serve --workers``'s workers)."""
    return sorted(
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    )


def call(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> Any:
    """GET ``url`` (POST ``body`` as JSON when given) on a new connection; the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def read_back(url: str, within_s: float = 30) -> Any:
    """``call(url)``, sent again after each 503 (the service's "retry later", e.g. Redis slower
    than its deadline on a machine busy with other work) for up to ``within_s``, as a client
    told to retry would: a check of what was stored, not of how fast it answers."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call(url)
        except urllib.error.HTTPError as err:
            if err.code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(float(err.headers.get("Retry-After") or 1))


def wait_for(url: str, procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 120) -> Any:
    """``url``'s JSON answer, once there is one (e.g. ``/healthz``: the lifespan has loaded
    everything); RuntimeError if any of ``procs`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        exited = [p.returncode for p in procs if p.poll() is not None]
        if exited:
            raise RuntimeError(f"a server process exited ({exited[0]}) before {url} answered")
        try:
            return call(url, timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def app() -> FastAPI:
    """The child's app (``uvicorn --factory``): settings from the ``VISREC_*`` environment."""
    return create_app(Settings())  # type: ignore[call-arg]


def api_env(
    *, checkpoint: Path, features: Path, redis_url: str, prefix: str, timeout_ms: float = 50
) -> dict[str, str]:
    """The ``VISREC_*`` settings of a child API: no keys, no rate limit (one load client)."""
    return {
        "VISREC_CHECKPOINT": str(checkpoint),
        "VISREC_FEATURES": str(features),
        "VISREC_REDIS_URL": redis_url,
        "VISREC_REDIS_PREFIX": prefix,
        "VISREC_REDIS_TIMEOUT_MS": str(timeout_ms),
        "VISREC_DEVICE": "cpu",
        "VISREC_ENVIRONMENT": "development",
        "VISREC_RATE_LIMIT_PER_S": "0",
    }


@dataclass
class ApiServer:
    """The real app under uvicorn in a child process; ``start`` again after a kill restarts it."""

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300) -> None:
        """Start it and wait until ``/healthz`` answers (after the lifespan loaded everything)."""
        uvicorn = ["-m", "uvicorn", "harness.processes:app", "--factory"]
        where = ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(
            [sys.executable, *uvicorn, *where],
            cwd=ROOT,
            env={**os.environ, **self.env},
        )
        wait_for(f"{self.url}/healthz", [self.proc], timeout_s=timeout_s)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
