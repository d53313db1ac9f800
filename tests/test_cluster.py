"""The Redis stores and the service on a real Redis Cluster (``redis+cluster://``): nodes
started here from ``redis-server --cluster-enabled yes`` and joined with ``redis-cli --cluster
create``, each with AOF ``appendfsync always``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from harness import redis_servers
from harness.redis_servers import REDIS, Cluster
from service.api.app import create_app
from service.config import Settings
from service.offline.data.synthetic import World
from service.store.items import AddedItem, RedisItemStore
from service.store.profiles import EventConflict, Interaction, Profile, StoreUnavailable
from service.store.redis.profiles import RedisProfileStore


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
            assert await items.add(item) is True  # the same item again: a retry
            assert await items.add(replace(item, image=b"other")) is False  # the id exists
            assert await items.ids() == [77]
            (found,) = await items.get([77])
            assert (found.item_id, found.title, found.image) == (77, "new", b"png bytes")
            np.testing.assert_array_equal(found.features, features)
            (about,) = await items.about([77, 78])  # 78 was never added
            assert about.same_as(item) and about.features.size == 0
            rows = np.arange(6, dtype=np.float32).reshape(2, 3)
            await items.keep_rows("k", {77: rows})
            kept = await items.rows("k", [77, 78])
            assert kept.keys() == {77} and np.array_equal(kept[77], rows)
            assert await items.rows("another", [77]) == {}
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
        item = before[0]["item_id"]
        for user in USERS[:10]:
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


def test_no_acknowledged_write_is_lost_when_a_primary_dies(tmp_path: Path) -> None:
    """Writers add events (with ids) and count those acknowledged; a primary is SIGKILLed
    mid-way and one of its two replicas takes over (the other then replicates it, so its slots
    take acknowledged writes again). With WAIT 1 every acknowledged event is there after."""
    cluster = Cluster(tmp_path, replicas=2)
    try:
        cluster.start()
        asyncio.run(_writes_across_a_failover(cluster))
    finally:
        cluster.stop()


async def _writes_across_a_failover(cluster: Cluster) -> None:
    store = RedisProfileStore.from_url(
        cluster.url, prefix="t5", deadline_s=2.0, wait_replicas=1, wait_timeout_ms=500
    )
    acked: list[Interaction] = []
    refused = 0
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        nonlocal refused
        n = 0
        while not stop.is_set():
            user = USERS[(w + 4 * n) % len(USERS)]
            event = Interaction(user, 10_000 + 10 * n + w, None, f"w{w}-{n}")
            try:
                await store.add([event])
            except StoreUnavailable:
                refused += 1  # not acknowledged: sent again, with its id, after a pause
                await asyncio.sleep(0.05)
                continue
            acked.append(event)
            n += 1

    try:
        await store.load({u: [1] for u in USERS})
        victim_key = store.keys(USERS[0]).profile
        victim = store._client.get_node_from_key(victim_key)
        assert victim is not None
        writers = [asyncio.create_task(writer(w)) for w in range(4)]
        await asyncio.sleep(1.0)
        before = len(acked)
        cluster.kill(victim.port)  # SIGKILL: no shutdown, nothing flushed
        killed_at = len(acked)
        deadline = asyncio.get_running_loop().time() + 40
        while asyncio.get_running_loop().time() < deadline:  # until its users are written again
            await asyncio.sleep(0.2)
            late = [e for e in acked[killed_at:] if e.user_id == USERS[0]]
            if late:
                break
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*writers)
        assert before > 0 and refused > 0  # writes went on before, and the failover was felt
        assert [e for e in acked[killed_at:] if e.user_id == USERS[0]]  # served again after
        profiles = await _read_once_settled(store, USERS)
        seen = dict(zip(USERS, (p.seen for p in profiles), strict=True))
        lost = [e.event_id for e in acked if e.item_id not in seen[e.user_id]]
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged writes lost"
    finally:
        await store.close()


async def _read_once_settled(store: RedisProfileStore, users: list[str]) -> list[Profile]:
    """Right after a failover a node asked for the slot map may still name the dead primary
    (gossip lags), so a read can be refused for a moment, as it would be for any client: read
    again, as a client would, until the cluster has settled."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            return await store.profiles(users)
        except StoreUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


def test_wait_on_a_redis_without_replicas_acknowledges_nothing(tmp_path: Path) -> None:
    """No replica can have the write, so it is refused (maybe applied): send it again later."""

    async def scenario() -> StoreUnavailable:
        store = RedisProfileStore.from_url(
            REDIS, prefix=f"t6-{tmp_path.name}", deadline_s=2.0, wait_replicas=1, wait_timeout_ms=50
        )
        try:
            with pytest.raises(StoreUnavailable) as refused:
                await store.add([Interaction("u", 3, None, "once")])
            return refused.value
        finally:
            await store.close()

    refused = asyncio.run(scenario())
    assert "reached 0 of 1 replica" in refused.reason and refused.maybe_applied


def test_a_clusters_nodes_never_get_the_same_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node started a moment before may not listen yet, so a free port can come back for
    the next node: CI once failed with the second node's folder existing."""
    handed = iter([40001, 40001, 50001, 40002])  # 50001: the first node's cluster bus port
    monkeypatch.setattr(redis_servers, "free_port", lambda: next(handed))
    assert redis_servers._node_port(taken={40001}) == 40002
