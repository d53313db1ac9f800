"""For tests that run real `visrec-serve` processes on loopback over the local Redis."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis

REDIS = "redis://127.0.0.1:6379/0"
SERVE = str(Path(sys.executable).parent / "visrec-serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    """GET ``url`` (POST ``body`` as JSON when given) on a new connection; the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(url: str, procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 120) -> dict:
    """``url``'s /readyz answer, once there is one; fails if any of ``procs`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert all(p.poll() is None for p in procs), "a server process exited"
        try:
            return call(f"{url}/readyz", timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextmanager
def redis_prefix(name: str) -> Iterator[str]:
    """A key prefix of the test's own on the local Redis; its keys are deleted after."""
    prefix = f"test-{name}-{uuid.uuid4().hex}"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
