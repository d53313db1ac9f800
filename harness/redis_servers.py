"""Redis of one's own on loopback: a server (restartable on its files), a Redis Cluster, a
prefix of one's own on the shared Redis; and what a durability check reads back."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import redis

from harness.processes import free_port
from service.model.projection import Projection, project
from service.store.codec import decode_profile
from service.store.items import AddedItem, RedisItemStore
from service.store.redis.profiles import user_keys

REDIS = "redis://127.0.0.1:6379/0"  # the Redis that runs before the tests (scripts/with-redis)


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
class RedisServer:
    """A redis-server of our own on loopback, its files in ``folder``; ``start`` again after a
    kill restarts it on the same port and files."""

    folder: Path
    fsync: str = "always"  # appendfsync always / everysec / no, or "off": no AOF
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20) -> None:
        aof = ["--appendonly", "no"] if self.fsync == "off" else ["--appendonly", "yes"]
        fsync = [] if self.fsync == "off" else ["--appendfsync", self.fsync]
        folder = self.folder.resolve()  # redis-server changes into it before opening its log
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder)]
        log = ["--logfile", str(folder / "redis.log")]
        self.proc = subprocess.Popen(["redis-server", *where, "--save", "", *aof, *fsync, *log])
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:  # until it answers (a restart answers LOADING while it reads its AOF)
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final write; only what Redis wrote before survives."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def add_items(
    url: str,
    prefix: str,
    ids: range,
    shape: tuple[int, int],
    projection: Projection | None = None,
) -> None:
    """Items as ``POST /items`` stores them, through the item store of ``prefix`` at ``url``:
    a small PNG and random float16 features of ``shape`` (125 KB each at EfficientNet-Lite0's
    (49, 1280)), and, given the serving model's ``projection``, their rows through it, as the
    process that added them keeps them; 200 at a time."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 12), (200, 40, 40)).save(out, format="PNG")
    image, rng = out.getvalue(), np.random.default_rng(0)

    async def add() -> None:
        store = RedisItemStore.from_url(url, prefix=prefix, deadline_s=30)
        try:
            for start in range(ids.start, ids.stop, 200):
                numbers = range(start, min(start + 200, ids.stop))
                features = rng.normal(size=(len(numbers), *shape)).astype(np.float16)
                items = [
                    AddedItem(n, f"added {n}", "image/png", image, f)
                    for n, f in zip(numbers, features, strict=True)
                ]
                assert all(await asyncio.gather(*map(store.add, items)))
                if projection is not None:
                    rows = project([i.features for i in items], projection).numpy()
                    kept = {i.item_id: r for i, r in zip(items, rows, strict=True)}
                    await store.keep_rows(projection.key, kept)
        finally:
            await store.close()

    asyncio.run(add())


@dataclass(frozen=True)
class Acked:
    user_id: str
    item_id: int
    event_id: str


def found_afterwards(server: RedisServer, prefix: str, acked: Sequence[Acked]) -> int:
    """How many acknowledged interactions Redis holds: the event id in the user's event log
    and the item in their profile."""
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for event in acked:
        keys = user_keys(prefix, event.user_id)
        pipe.zscore(keys.events, event.event_id)
        pipe.get(keys.profile)
    replies = pipe.execute()
    client.close()
    pairs = zip(acked, replies[::2], replies[1::2], strict=True)
    return sum(
        logged is not None and e.item_id in decode_profile(blob).seen for e, logged, blob in pairs
    )


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
            port = _node_port(taken=set(self.ports))
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
            _wait(partial(redis.Redis(port=port).ping))
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


def _node_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free and valid too, and neither of them
    one of the ``taken`` nodes' (a node started a moment ago may not listen yet: the same port
    came back twice once, and the second node's folder existed)."""
    busy = taken | {t + 10_000 for t in taken} | {t - 10_000 for t in taken}
    while True:
        port = free_port()
        if port + 10_000 <= 65_535 and not {port, port + 10_000} & busy:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port + 10_000)) != 0:
                    return port


def _wait(ready: Callable[[], object], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the Redis Cluster did not come up")
        time.sleep(0.05)
