"""Faults of the profile store: reads degrade and recover, writes are refused, never dropped.

The app runs in process (its lifespan running) against a redis-server of this module's own, on
a free port, which the tests kill, restart and pause; the shared Redis is never touched. The
model is a random-weight ACF over random features (``synthetic_catalogue``): these tests are
about what the service answers when Redis fails, not about the quality of the ranking.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import exceptions as rx

from benchmarks.fault_injection import RedisServer
from benchmarks.serve_load import Catalogue, synthetic_catalogue
from service.api.app import create_app
from service.store.profiles import (
    Interaction,
    MemoryProfileStore,
    Profile,
    RedisProfileStore,
    StoreUnavailable,
    decode_profile,
    is_outage,
    user_keys,
)
from service.store.resilient import ProfileCache, ResilientStore, with_items

TIMEOUT_MS = 100  # the service default is 50; more room here on a busy test machine
# What a request may take while Redis hangs: the timeout plus the app's own work, with room
# for a busy 2-core machine. Far below the pauses used, so a missing timeout fails the test.
BOUND_S = 0.6


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    return synthetic_catalogue(200, tmp_path_factory.mktemp("catalogue"), n_users=100, dim=16)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), fsync="always")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test-resilience-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def client(catalogue: Catalogue, server: RedisServer, prefix: str) -> Iterator[TestClient]:
    settings = catalogue.settings.model_copy(
        update={"redis_url": server.url, "redis_prefix": prefix, "redis_timeout_ms": TIMEOUT_MS}
    )
    with TestClient(create_app(settings, profiles=catalogue.histories)) as c:
        yield c


@pytest.fixture
def redis_running(server: RedisServer) -> Iterator[RedisServer]:
    """The module's Redis, started again after the test whatever the test did to it."""
    yield server
    if server.proc is None:
        server.start()


def stored(server: RedisServer, prefix: str, user: str) -> tuple[Profile, list[bytes]]:
    """The user's profile and logged event ids, read straight from Redis."""
    keys = user_keys(prefix, user)
    redis = server.client()
    try:
        return decode_profile(redis.get(keys.profile)), redis.zrange(keys.events, 0, -1)
    finally:
        redis.close()


def items(body: dict[str, Any]) -> list[int]:
    return [x["item_id"] for x in body["items"]]


# --------------------------------------------------------------------------- Redis down


def test_redis_down_reads_degrade_writes_are_refused_and_it_recovers_alone(
    client: TestClient, redis_running: RedisServer, prefix: str
) -> None:
    before = client.get("/recommend/3", params={"k": 10}).json()
    assert before["degraded"] is False
    new_item = items(before)[0]  # not seen yet: it leaves the list once the write is applied
    event = {"user_id": "3", "item_id": new_item, "event_id": "down-1"}

    redis_running.kill()
    # More reads than the client's 50 pooled connections: failed calls must not leak them.
    for _ in range(60):
        during = client.get("/recommend/3", params={"k": 10})
        assert during.status_code == 200
        assert during.json()["degraded"] is True
        assert during.json()["items"] == before["items"]  # the cached profile, same answer
    unknown = client.get("/recommend/user-never-read").json()
    assert (unknown["degraded"], unknown["fallback"]) == (True, True)  # popular items
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert (ready.json()["ready"], ready.json()["degraded"]) == (True, True)
    assert ready.json()["store"] == "redis: unreachable"
    refused = client.post("/interactions", json={"events": [event]})
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert "event_id" in refused.json()["detail"]  # says that retrying is safe
    explain = client.get("/explain/3", params={"item_id": new_item})
    assert (explain.status_code, explain.headers["Retry-After"]) == (503, "1")

    redis_running.start()  # the app is not restarted
    ready = client.get("/readyz").json()
    assert (ready["degraded"], ready["durable"], ready["store"]) == (False, True, "redis: ok")
    profile, logged = stored(redis_running, prefix, "3")
    assert new_item not in profile.seen and logged == []  # the refused write left no trace
    after = client.get("/recommend/3", params={"k": 10}).json()
    assert (after["degraded"], after["items"]) == (False, before["items"])
    assert client.post("/interactions", json={"events": [event]}).json()["applied"] == 1
    after = client.get("/recommend/3", params={"k": 10}).json()
    assert after["degraded"] is False
    assert new_item not in items(after)


def test_redis_paused_answers_within_the_bound(
    client: TestClient, redis_running: RedisServer, prefix: str
) -> None:
    before = client.get("/recommend/5", params={"k": 10}).json()
    event = {"user_id": "5", "item_id": items(before)[0], "event_id": "paused-1"}
    pause_s = 2.0
    redis = redis_running.client()
    redis.execute_command("CLIENT", "PAUSE", int(pause_s * 1000), "ALL")  # Redis hangs
    paused_at = time.monotonic()

    started = time.monotonic()
    during = client.get("/recommend/5", params={"k": 10})
    assert time.monotonic() - started < BOUND_S
    assert during.status_code == 200
    assert (during.json()["degraded"], during.json()["items"]) == (True, before["items"])
    started = time.monotonic()
    write = client.post("/interactions", json={"events": [event]})
    assert time.monotonic() - started < BOUND_S
    assert (write.status_code, write.headers["Retry-After"]) == (503, "1")
    started = time.monotonic()
    assert client.get("/readyz").json()["degraded"] is True
    assert time.monotonic() - started < BOUND_S
    assert time.monotonic() - paused_at < pause_s  # all of the above saw Redis hang

    time.sleep(max(0.0, pause_s + 0.1 - (time.monotonic() - paused_at)))
    redis.close()
    after = client.get("/recommend/5", params={"k": 10}).json()
    assert after["degraded"] is False
    # The timed-out write may or may not have reached Redis; sent again with its event id,
    # it is applied exactly once either way.
    for _ in range(2):
        assert client.post("/interactions", json={"events": [event]}).status_code == 200
    profile, logged = stored(redis_running, prefix, "5")
    assert event["item_id"] in profile.seen
    assert logged == [b"paused-1"]


# --------------------------------------------------------------------------- the parts


class FlakyStore(MemoryProfileStore):
    """A memory store that can be switched off: then every call raises StoreUnavailable."""

    down = False

    async def profiles(self, user_ids: Sequence[str]) -> list[Profile]:
        self._fail()
        return await super().profiles(user_ids)

    async def add(self, events: Sequence[Interaction]) -> int:
        self._fail()
        return await super().add(events)

    def _fail(self) -> None:
        if self.down:
            raise StoreUnavailable("switched off")


def test_reads_fall_back_to_the_cache_and_writes_fail_loudly() -> None:
    async def scenario() -> None:
        inner = FlakyStore()
        store = ResilientStore(inner, cache_size=10)
        await inner.add([Interaction("a", i) for i in (1, 2, 3)])
        up = await store.read(["a", "nobody"])
        assert up.degraded is False
        inner.down = True
        down = await store.read(["a", "nobody"])
        assert down.degraded is True
        assert down.profiles == up.profiles  # the cached one, and the empty one
        with pytest.raises(StoreUnavailable):
            await store.add([Interaction("a", 4)])
        assert (await store.read(["a"])).profiles == up.profiles[:1]  # the failed write: no trace
        with pytest.raises(StoreUnavailable):
            await store.profiles(["a"])  # the plain protocol still says the truth

    asyncio.run(scenario())


def test_cached_profiles_follow_writes_exactly_as_the_store_does() -> None:
    """Slow reference: after any add, a cached profile equals the store's own."""

    async def scenario() -> None:
        rng = random.Random(3)
        inner = FlakyStore(max_recent=4)
        store = ResilientStore(inner, cache_size=100)
        users = ["a", "b", "c"]
        for step in range(300):
            if rng.random() < 0.3:
                await store.read([rng.choice(users)])  # caches it
            batch = [
                Interaction(
                    rng.choice(users), rng.randrange(12), None, rng.choice(["", f"e{step}", "dup"])
                )
                for _ in range(rng.randint(1, 4))
            ]
            await store.add(batch)
            truth = await inner.profiles(users)
            for user, profile in zip(users, truth, strict=True):
                cached = store.cache.get(user)
                assert cached is None or cached == profile, (step, user)

    asyncio.run(scenario())


def test_the_cache_keeps_the_most_recent_users_only() -> None:
    cache = ProfileCache(2)
    profile = Profile([3, 1], frozenset({1, 2, 3}))
    cache.put("a", profile)
    cache.put("b", profile)
    assert cache.get("a") == profile  # "a" is now the most recent
    cache.put("c", profile)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (profile, None, profile)
    assert len(cache) == 2
    assert len(ProfileCache(0)) == 0
    ProfileCache(0).put("a", profile)
    with pytest.raises(ValueError, match="at least 0"):
        ProfileCache(-1)


def test_with_items_is_the_stores_rule() -> None:
    profile = Profile([1, 2, 3], frozenset({1, 2, 3, 9}))
    assert with_items(profile, [2, 5], max_recent=3) == Profile(
        [3, 2, 5], frozenset({1, 2, 3, 5, 9})
    )


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),  # the deadline
        (rx.ConnectionError("Connection closed by server."), True),
        (rx.BusyLoadingError("Redis is loading the dataset in memory"), True),
        (rx.TimeoutError("Timeout reading from socket"), True),
        (rx.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True),
        (rx.ResponseError("MISCONF Errors writing to the AOF file"), True),
        (rx.ReadOnlyError("You can't write against a read only replica."), True),
        (rx.ResponseError("Error running script (call to f_0): bad argument"), False),
        (rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (ValueError("a bug"), False),
    ],
)
def test_outages_are_told_apart_from_bad_calls(error: Exception, outage: bool) -> None:
    assert is_outage(error) is outage


def test_a_store_past_its_deadline_is_unavailable(tmp_path: Path) -> None:
    """The deadline holds for the store alone, without the app around it."""
    server = RedisServer(tmp_path)
    server.start()
    redis = server.client()

    async def scenario() -> None:
        store = RedisProfileStore.from_url(server.url, deadline_s=TIMEOUT_MS / 1000)
        try:
            assert await store.ping()
            redis.execute_command("CLIENT", "PAUSE", 1000, "ALL")
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="TimeoutError"):
                await store.profiles(["a"])
            assert not await store.ping()
            assert time.monotonic() - started < BOUND_S
        finally:
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        redis.close()
        server.kill()
