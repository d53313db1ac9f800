"""For tests that run real `visrec-serve` processes on loopback over the local Redis, and real
Redis Clusters (:class:`Cluster`)."""

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
from dataclasses import dataclass, field
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


@dataclass
class Cluster:
    folder: Path
    primaries: int = 3
    replicas: int = 0  # per primary
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for _ in range(self.primaries * (1 + self.replicas)):
            port = _node_port()
            where = self.folder / str(port)
            where.mkdir()
            node = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(where)]
            cluster = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
            aof = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            self.procs.append(
                subprocess.Popen(["redis-server", *node, *cluster, *aof, "--logfile", "redis.log"])
            )
            self.ports.append(port)
        for port in self.ports:
            _wait(lambda p=port: redis.Redis(port=p).ping())
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas",
             str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True,
        )  # fmt: skip
        _wait(self._ready)

    def _ready(self) -> bool:
        """Every node sees the whole cluster, serving, with every replica attached, in sync
        with its primary, and known as a replica to all (a joining node first shows as a
        primary without slots)."""
        for port in self.ports:
            node = redis.Redis(port=port)
            info = node.cluster("info")
            if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) < len(self.ports):
                return False
            replication = node.info("replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
            seen = node.cluster("nodes").values()
            if sum("slave" in n["flags"] for n in seen) != self.primaries * self.replicas:
                return False
        return True

    def kill(self, port: int) -> None:
        proc = self.procs[self.ports.index(int(port))]
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _node_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10_000 <= 65_535:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port + 10_000)) != 0:
                    return port


def _wait(ready: object, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the Redis Cluster did not come up")
        time.sleep(0.05)
