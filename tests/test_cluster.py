"""The Redis stores and the service on a real Redis Cluster (``redis+cluster://``): nodes
started here from ``redis-server --cluster-enabled yes`` and joined with ``redis-cli --cluster
create``, each with AOF ``appendfsync always``."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.offline.synthetic import World
from service.store.items import AddedItem, RedisItemStore
from service.store.profiles import EventConflict, Interaction, RedisProfileStore
from tests.servers import free_port


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
        """Every node sees the whole cluster, serving, and every replica is attached."""
        for port in self.ports:
            info = redis.Redis(port=port).cluster("info")
            if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) < len(self.ports):
                return False
        nodes = redis.Redis(port=self.ports[0]).cluster("nodes").values()
        return sum("slave" in n["flags"] for n in nodes) == self.primaries * self.replicas

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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """3 primaries, no replicas."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


USERS = [f"user-{n}" for n in range(40)]


def test_the_profile_store_on_a_cluster(cluster: Cluster) -> None:
    async def scenario() -> None:
        store = RedisProfileStore.from_url(cluster.url, prefix="t1", deadline_s=2.0)
        try:
            await store.load({u: [1, 2, n + 3] for n, u in enumerate(USERS)})
            nodes = {store._client.get_node_from_key(store.keys(u).profile).name for u in USERS}
            assert len(nodes) == 3  # the users' keys are spread over every primary
            loaded = await store.profiles(USERS)
            assert [p.recent for p in loaded] == [[1, 2, n + 3] for n in range(len(USERS))]

            # one call for every user: one script per user, all applied
            events = [Interaction(u, 100 + n, None, f"e-{n}") for n, u in enumerate(USERS)]
            assert await store.add(events) == len(USERS)
            assert await store.add(events) == 0  # the same event ids: applied once
            after = await store.profiles(USERS)
            assert [p.recent[-1] for p in after] == [100 + n for n in range(len(USERS))]

            # a reused id refuses that user's events; the others' are applied (per user)
            clash = [Interaction(USERS[0], 999, None, "e-0"), Interaction(USERS[1], 500, None, "x")]
            with pytest.raises(EventConflict, match="e-0"):
                await store.add(clash)
            first, second = await store.profiles(USERS[:2])
            assert 999 not in first.seen and second.recent[-1] == 500

            assert await store.durable() is True  # appendfsync always on every node
            assert await store.write_refusal() is None
            replication = await store.replication()
            assert replication is not None and "3 without a replica" in replication
            assert "per node" in replication
        finally:
            await store.close()

    asyncio.run(scenario())


def test_added_items_on_a_cluster(cluster: Cluster) -> None:
    async def scenario() -> None:
        items = RedisItemStore.from_url(cluster.url, prefix="t2", deadline_s=2.0)
        try:
            features = np.arange(12, dtype=np.float16).reshape(3, 4)
            item = AddedItem(77, "new", "image/png", b"png bytes", features)
            assert await items.add(item) is True
            assert await items.add(item) is False  # the id exists
            assert await items.ids() == [77]
            (found,) = await items.get([77])
            assert (found.item_id, found.title, found.image) == (77, "new", b"png bytes")
            np.testing.assert_array_equal(found.features, features)
        finally:
            await items.close()

    asyncio.run(scenario())


def test_the_service_reads_its_writes_on_a_cluster(
    cluster: Cluster, served_work_dir: Path, world: World
) -> None:
    run_dir = served_work_dir / world.root.resolve().name
    settings = Settings(
        checkpoint=run_dir / "acf.pt",
        features=run_dir / "features-efficientnet_lite0",
        device="cpu",
        environment="development",
        redis_url=cluster.url,
        redis_prefix="t3",
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert ready["durable"] is True and "per node" in ready["replication"]
        before = client.get("/recommend/someone?k=5").json()["items"]
        assert before
        for user in USERS[:10]:
            item = before[0]["item_id"]
            r = client.post("/interactions", json={"events": [{"user_id": user, "item_id": item}]})
            assert r.status_code == 200, r.text
            answer = client.get(f"/recommend/{user}?k=5").json()
            assert item not in [i["item_id"] for i in answer["items"]]  # seen: excluded
            assert answer["fallback"] is False  # a profile now: not the popular items


def test_a_cluster_with_replicas_says_so(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, replicas=1)
    try:
        cluster.start()

        async def replication() -> str | None:
            store = RedisProfileStore.from_url(cluster.url, prefix="t4", deadline_s=2.0)
            try:
                return await store.replication()
            finally:
                await store.close()

        assert asyncio.run(replication()) == "Redis Cluster of 3 primaries, each with a replica"
    finally:
        cluster.stop()


def test_a_registry_is_refused_on_a_cluster_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not run on a Redis Cluster"):
        Settings(
            checkpoint=tmp_path / "a.pt",
            features=tmp_path,
            environment="development",
            redis_url="redis+cluster://127.0.0.1:7000",
            registry=tmp_path / "registry",
        )
