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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import exceptions as rx

from harness.catalogues import Catalogue, synthetic_catalogue
from harness.redis_servers import RedisServer
from service.api.app import create_app
from service.api.lifespan import ended
from service.api.patches import Patches
from service.store.codec import decode_profile, encode_profile
from service.store.epoch import EpochWatch
from service.store.journal import Journal
from service.store.memory import MemoryProfileStore
from service.store.patches import RedisTable
from service.store.profiles import EventConflict, Interaction, Profile, StoreUnavailable
from service.store.redis.client import is_outage, nothing_applied
from service.store.redis.deadline import LoopLag, deadline
from service.store.redis.profiles import RedisProfileStore, user_keys
from service.store.resilient import ProfileCache, ResilientStore, with_events

TIMEOUT_MS = 100  # the service default is 50; more room here on a busy test machine
# What a request may take while Redis hangs: the timeout plus the app's own work, with room
# for a machine busy with other work (0.6 s failed under a parallel CPU load). Far below the
# pauses used, so a missing timeout still fails the test.
BOUND_S = 2.0


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
    pause_s = 8.0  # above three calls at BOUND_S each
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
            batch = []
            for _ in range(rng.randint(1, 4)):
                item = rng.randrange(12)
                when = rng.choice([None, float(rng.randrange(100))])  # late and untimed events
                event_id = rng.choice(["", f"e{step}-{item}-{when}", f"dup-{item}-{when}"])
                batch.append(Interaction(rng.choice(users), item, when, event_id))
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


def test_with_events_is_the_stores_rule() -> None:
    profile = Profile([1, 2, 3], frozenset({1, 2, 3, 9}), (10_000, 20_000, 30_000))
    new = [Interaction("u", 2, None), Interaction("u", 5, 25.0), Interaction("u", 7, 1.0)]
    after = with_events(profile, new, max_recent=3, now=40.0)
    assert after == Profile([5, 3, 2], frozenset({1, 2, 3, 5, 7, 9}))  # 7 came too late
    assert after.times == (25_000, 30_000, 40_000)


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
        (
            rx.ResponseError("Command # 2 (EVALSHA ab 2) of pipeline caused error: ('MISCONF x',)"),
            True,
        ),
        (rx.ReadOnlyError("You can't write against a read only replica."), True),
        (rx.ResponseError("Error running script (call to f_0): bad argument"), False),
        (rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (ValueError("a bug"), False),
    ],
)
def test_outages_are_told_apart_from_bad_calls(error: Exception, outage: bool) -> None:
    assert is_outage(error) is outage


@pytest.mark.parametrize(
    ("error", "nothing"),
    [
        (rx.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True),
        (rx.ReadOnlyError("You can't write against a read only replica."), True),
        (rx.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."), True),
        (rx.ConnectionError("No connection available."), True),
        (rx.ResponseError("MISCONF Errors writing to the AOF file"), True),
        (rx.ConnectionError("Connection closed by server."), False),  # maybe mid-reply
        (TimeoutError(), False),  # the deadline: the call may have run
        (rx.TimeoutError("Timeout reading from socket"), False),
    ],
)
def test_refusals_that_applied_nothing_are_told_apart(error: Exception, nothing: bool) -> None:
    assert nothing_applied(error) is nothing


def test_a_store_past_its_deadline_is_unavailable(tmp_path: Path) -> None:
    """The deadline holds for the store alone, without the app around it."""
    server = RedisServer(tmp_path)
    server.start()
    redis = server.client()

    async def scenario() -> None:
        store = RedisProfileStore.from_url(server.url, deadline_s=TIMEOUT_MS / 1000)
        try:
            assert await store.ping()
            redis.execute_command("CLIENT", "PAUSE", 5000, "ALL")
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


# --------------------------------------------------------------------------- faults in batches

POOL = 4  # pooled connections of the stores below: few, so a leak empties the pool at once


def batch_of(n: int, users: int, *, tag: str = "b") -> list[Interaction]:
    """A batch of ``users`` new users, one event each (with an id)."""
    return [Interaction(f"{tag}{n}-{u}", 1 + u % 200, None, f"{tag}{n}-{u}") for u in range(users)]


async def outcomes(store: RedisProfileStore, batches: Sequence[list[Interaction]]) -> list[str]:
    """Each batch added concurrently: "ok", or the reason it was refused."""

    async def one(events: list[Interaction]) -> str:
        try:
            await store.add(events)
        except StoreUnavailable as exc:
            return str(exc)
        return "ok"

    return list(await asyncio.gather(*(one(b) for b in batches)))


@pytest.mark.parametrize("fault", ["pause", "kill"])
def test_faults_during_multi_user_batches_leave_the_pool_whole(tmp_path: Path, fault: str) -> None:
    """redis-py's ``Pipeline.execute`` runs SCRIPT EXISTS before its own clean-up: a fault or the
    deadline there kept the pooled connection for good, until no write could get one."""
    server = RedisServer(tmp_path)
    server.start()
    admin = server.client()

    async def scenario() -> None:
        store = RedisProfileStore.from_url(
            server.url, max_connections=POOL, deadline_s=0.1, write_deadline_s=0.1
        )
        try:
            warm = await outcomes(store, [batch_of(n, 20) for n in range(POOL)])
            assert warm == ["ok"] * POOL  # every pooled connection is open
            if fault == "pause":
                admin.execute_command("CLIENT", "PAUSE", 5000, "ALL")  # one 5 s hang: longer than
                # the deadline stretches on a busy event loop (it counts the time Redis had)
            else:
                server.kill()
            # Batches in flight when the fault hits: each has a pooled connection, most are in
            # SCRIPT EXISTS when the deadline or the broken connection ends them.
            refused = await outcomes(store, [batch_of(100 + n, 20) for n in range(3 * POOL)])
            assert "ok" not in refused
            if fault == "kill":
                server.start()  # returns once it answers
            else:
                admin.ping()  # answered once the pause is over
            pool = store._client.connection_pool
            assert len(pool._in_use_connections) == 0  # type: ignore[attr-defined]
            # What is checked now is the pool (a kept connection would leave a write waiting for
            # one until its deadline), not the deadline: 0.1 s failed on a busy CI machine
            store.deadline_s = store.write_deadline_s = 2.0
            after = await outcomes(store, [batch_of(200 + n, 20) for n in range(2 * POOL)])
            assert after == ["ok"] * (2 * POOL)
        finally:
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        admin.close()
        server.kill()


def used_memory(redis: Any) -> int:
    return int(redis.info("memory")["used_memory"])


def test_an_out_of_memory_redis_refuses_whole_batches_and_says_why(tmp_path: Path) -> None:
    """A script without declared flags was let past maxmemory after its first write command;
    without a transaction, a batch crossing the limit was applied in part."""
    server = RedisServer(tmp_path)
    server.start()
    admin = server.client()
    limit = used_memory(admin) + 1_000_000
    admin.config_set("maxmemory", limit)
    admin.config_set("maxmemory-policy", "noeviction")

    async def scenario() -> None:
        store = RedisProfileStore.from_url(server.url, deadline_s=2, write_deadline_s=2)
        try:
            assert await store.write_refusal() is None
            accepted: list[list[Interaction]] = []
            refused: StoreUnavailable | None = None
            for n in range(40):
                batch = batch_of(n, 1000, tag="oom")
                try:
                    await store.add(batch)
                except StoreUnavailable as exc:
                    refused = exc
                    break
                accepted.append(batch)
            assert refused is not None, "40 batches of 1,000 new users fitted into 1 MB"
            assert refused.maybe_applied is False
            assert "out of memory" in refused.reason
            assert used_memory(admin) < limit + 400_000  # at most the batch that crossed it
            # Whole batches or nothing: every user of an accepted batch, none of the refused one.
            found = await store.profiles([e.user_id for b in accepted for e in b])
            assert all(p.seen for p in found)
            found = await store.profiles([e.user_id for e in batch])
            assert not any(p.seen for p in found)
            # A client's query buffer counts as used memory: the refused batch's own size may
            # have tipped it. Below the limit for good, one user's write is refused as well.
            admin.config_set("maxmemory", used_memory(admin) // 2)
            with pytest.raises(StoreUnavailable, match="out of memory"):
                await store.add(batch_of(999, 1, tag="one"))  # one user: one script, refused
            assert "out of memory" in (await store.write_refusal() or "")
            admin.config_set("maxmemory", 0)
            assert await store.write_refusal() is None
            assert await store.add(batch) == len(batch)
        finally:
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        admin.close()
        server.kill()


def test_out_of_memory_is_a_503_saying_nothing_was_applied_and_readyz_says_why(
    client: TestClient, redis_running: RedisServer
) -> None:
    admin = redis_running.client()
    admin.config_set("maxmemory", used_memory(admin) + 300_000)
    try:
        for n in range(40):
            body = {
                "events": [
                    {"user_id": e.user_id, "item_id": e.item_id, "event_id": e.event_id}
                    for e in batch_of(n, 1000, tag="api-oom")
                ]
            }
            r = client.post("/interactions", json=body)
            if r.status_code != 200:
                break
        assert r.status_code == 503
        assert r.json()["nothing_applied"] is True
        assert "out of memory" in r.json()["reason"]
        assert "Nothing was applied" in r.json()["detail"]
        # The refused batch's own query buffer may have tipped Redis over: below the limit for
        # good (data over maxmemory), /readyz says why writes are refused.
        admin.config_set("maxmemory", used_memory(admin) // 2)
        ready = client.get("/readyz").json()
        assert ready["degraded"] is True
        assert "out of memory" in ready["store"]
        assert client.get("/recommend/3").json()["degraded"] is False  # reads still work
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    assert client.get("/readyz").json()["store"] == "redis: ok"


def test_a_timed_out_write_says_it_may_have_been_applied(
    client: TestClient, redis_running: RedisServer
) -> None:
    admin = redis_running.client()
    # long enough to outlast a slow request's way to Redis on a busy machine; unpaused after it
    admin.execute_command("CLIENT", "PAUSE", 5000, "ALL")
    try:
        events = [{"user_id": f"late-{u}", "item_id": 1, "event_id": f"late-{u}"} for u in range(3)]
        r = client.post("/interactions", json={"events": events})
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    assert r.status_code == 503
    assert r.json()["nothing_applied"] is False
    assert "same event_ids" in r.json()["detail"]
    again = client.post("/interactions", json={"events": events}).json()
    assert again["applied"] in (0, 3)  # whole or nothing, never in part


# --------------------------------------------------------------------------- a busy event loop


@asynccontextmanager
async def busy_loop(spell_s: float) -> AsyncIterator[None]:
    """While open, the running loop is busy for ``spell_s`` at every turn, as a saturated
    server's requests keep it: whatever else runs gets a moment between two spells."""
    stop = asyncio.Event()

    async def hog() -> None:
        while not stop.is_set():
            time.sleep(spell_s)
            await asyncio.sleep(0)

    task = asyncio.create_task(hog())
    await asyncio.sleep(0)
    try:
        yield
    finally:
        stop.set()
        await task


def after_turns(turns: int, callback: Callable[[], object]) -> None:
    """Run ``callback`` on the running loop ``turns`` turns from now."""
    loop = asyncio.get_running_loop()
    if turns == 0:
        loop.call_soon(callback)
    else:
        loop.call_soon(after_turns, turns - 1, callback)


def test_a_busy_event_loop_does_not_time_out_a_healthy_redis(tmp_path: Path) -> None:
    """Redis answers within a millisecond, but the loop is busy (as a saturated server's is)
    for longer than the deadline while the answer waits in the socket. A plain asyncio.timeout
    expired meanwhile and refused the call (a refused write had been applied): 3.6% of writes
    at 50 writers. The busy spell starts 0 to 19 loop turns into the call, so it lands at every
    step of it (waiting for a connection, sending, reading the reply)."""
    server = RedisServer(tmp_path)
    server.start()

    async def scenario() -> list[str]:
        store = RedisProfileStore.from_url(server.url, deadline_s=0.05, write_deadline_s=0.05)
        refused = []
        try:
            assert await store.ping()
            for turns in range(20):
                for call in ("add", "batch", "read"):
                    after_turns(turns, lambda: time.sleep(0.08))
                    try:
                        if call == "add":
                            await store.add([Interaction("busy", 1 + turns)])
                        elif call == "batch":
                            await store.add(batch_of(turns, 5, tag="busy"))
                        else:
                            await store.profiles(["busy"])
                    except StoreUnavailable as exc:
                        refused.append(f"{call} at turn {turns}: {exc}")
        finally:
            await store.close()
        return refused

    try:
        assert asyncio.run(scenario()) == []
    finally:
        server.kill()


def test_the_deadline_counts_the_loops_free_time_only() -> None:
    async def scenario() -> None:
        lag = LoopLag()
        async with busy_loop(0.1), deadline(0.05, lag):  # the busy spells do not count
            await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):  # an idle loop: the wall clock
            async with deadline(0.05, lag):
                await asyncio.sleep(5)
        async with deadline(None, lag):
            await asyncio.sleep(0)
        assert lag.behind(asyncio.get_running_loop().time()) >= 0.15
        await lag.stop()

    asyncio.run(scenario())


def test_a_stop_ends_the_items_poll_whatever_call_it_is_in(redis_running: RedisServer) -> None:
    """A stop cancels the poll of PATCH /items' tables, often in the middle of a Redis call,
    where redis-py lets a cancel go as often as not on Python 3.11 (8.x about 70% of them, 7.4
    with a socket timeout about 30%: the call returns as if none came; 3.12 none): the stop
    then waited out its 10 s. It cancels again until the poll ends."""

    async def scenario() -> float | None:
        table = RedisTable.from_url(redis_running.url, key=uuid.uuid4().hex, deadline_s=BOUND_S)
        patches = Patches.of(table, table)
        try:
            for delay in np.linspace(0, 0.003, 60):  # mostly inside one of its calls
                poll = asyncio.create_task(patches.keep_current(every_s=0))
                await asyncio.sleep(delay)
                await ended([poll], BOUND_S, cancel=True)
                if not poll.done():
                    while not poll.done():  # end it before saying so
                        poll.cancel()
                        await asyncio.sleep(0.01)
                    return float(delay)
            return None
        finally:
            await table.close()

    assert asyncio.run(scenario()) is None  # the delay of a stop that did not end the poll


# --------------------------------------------------------------------------- Redis back empty


@pytest.mark.parametrize("source", [True, False], ids=["with-histories", "without"])
def test_a_redis_back_empty_is_noticed_reported_and_restored(
    catalogue: Catalogue, tmp_path: Path, caplog: pytest.LogCaptureFixture, source: bool
) -> None:
    """Redis without persistence restarted empty: answers said degraded: false, profiles were
    empty and nothing told. Now /readyz, /metrics and the log say so, and profiles come back
    from the histories the service was started with, merged under what was written since."""
    server = RedisServer(tmp_path, fsync="off")  # a restart loses everything
    server.start()
    settings = catalogue.settings.model_copy(
        update={"redis_url": server.url, "redis_prefix": "epoch", "redis_timeout_ms": TIMEOUT_MS}
    )
    app = create_app(settings, profiles=catalogue.histories if source else None)
    history = catalogue.histories["3"]
    try:
        with TestClient(app) as client:
            if not source:  # the profiles were loaded by someone else
                store = server.client()
                store.set(user_keys("epoch", "3").profile, encode_profile(history, history))
                store.close()
            assert client.get("/recommend/3").json()["fallback"] is False
            assert client.get("/readyz").json()["data_lost"] is None
            server.kill()
            server.start()  # empty
            new_item = next(i for i in range(1, 201) if i not in history)
            # A write that reached the empty Redis before anyone noticed (another process's).
            asyncio.run(add_one(server.url, "epoch", Interaction("3", new_item, None, "late")))
            # The first call after a restart may meet a pooled connection the restart broke
            # (redis-py then replaces them): /readyz says "unreachable" once, then the truth.
            for _ in range(3):
                ready = client.get("/readyz").json()
                if ready["data_lost"]:
                    break
            assert "came back empty" in ready["data_lost"]
            metrics = client.get("/metrics").text
            assert "visrec_store_data_losses_total 1.0" in metrics
            profile, _ = stored(server, "epoch", "3")
            if source:
                assert "merged back" in ready["data_lost"]
                assert profile.seen == {*history, new_item}  # restored, and the write kept
                assert profile.recent[-1] == new_item  # newer than the restored history
                assert client.get("/recommend/3").json()["fallback"] is False
            else:
                assert "started without the dataset's histories" in ready["data_lost"]
                assert profile.seen == {new_item}
            assert client.get("/readyz").json()["data_lost"] == ready["data_lost"]  # once
            assert "visrec_store_data_losses_total 1.0" in client.get("/metrics").text
    finally:
        server.kill()
    assert any("lost its data" in r.message and r.levelname == "ERROR" for r in caplog.records)


def test_live_events_come_back_after_a_flushall(catalogue: Catalogue, tmp_path: Path) -> None:
    """Redis FLUSHALLed under live writes: the dataset's histories came back, but every event
    acknowledged before it was lost (99 of them in each deployment of the fault matrix). Each
    process now writes back the events it acknowledged, and a client's retry is still applied
    once."""
    server = RedisServer(tmp_path, fsync="always")
    server.start()
    settings = catalogue.settings.model_copy(
        update={"redis_url": server.url, "redis_prefix": "journal", "redis_timeout_ms": TIMEOUT_MS}
    )
    users, rng, sent = ["3", "4", "fresh"], random.Random(0), []
    try:
        with TestClient(create_app(settings, profiles=catalogue.histories)) as client:
            for n in range(30):  # with and without times and ids, in several batches
                event: dict[str, Any] = {"user_id": users[n % 3], "item_id": rng.randrange(1, 201)}
                if n % 2:
                    event["event_id"] = f"e{n}"
                if n % 5 == 0:
                    event["timestamp"] = 1_700_000_000 + n
                assert client.post("/interactions", json={"events": [event]}).status_code == 200
                sent.append(event)
            before = {u: stored(server, "journal", u) for u in users}
            flush = server.client()
            flush.flushall()
            flush.close()
            for _ in range(3):  # the first call may meet a connection the flush left behind
                ready = client.get("/readyz").json()
                if ready["data_lost"]:
                    break
            assert "came back empty" in ready["data_lost"]
            assert "30 events this process had acknowledged written back" in ready["data_lost"]
            for user in users:
                profile, ids = stored(server, "journal", user)
                assert profile == before[user][0] and sorted(ids) == sorted(before[user][1])
            for retry in (sent[1], sent[5]):  # a client's retry, without and with a time
                answer = client.post("/interactions", json={"events": [retry]})
                assert (answer.status_code, answer.json()["applied"]) == (200, 0)
            other = {**sent[3], "item_id": sent[3]["item_id"] % 200 + 1}
            answer = client.post("/interactions", json={"events": [other]})
            assert answer.status_code == 409  # e3 names the event written back, not this one
    finally:
        server.kill()


def test_the_journal_keeps_the_newest_events_and_skips_conflicts() -> None:
    journal = Journal(3)
    events = [Interaction("u", i, None if i % 2 else 9.0) for i in range(1, 6)]
    journal.record(events[:2])
    journal.record(events[2:])
    assert len(journal) == 3 and journal.forgotten == 2
    written: list[Interaction] = []

    async def add(batch: Sequence[Interaction]) -> int:
        if len(batch) > 1 or batch[0].item_id == 4:
            raise EventConflict(["x"])  # the batch refused, then one of its events
        written.extend(batch)
        return len(batch)

    assert asyncio.run(journal.replay(add)) == 2
    assert [e.item_id for e in written] == [3, 5]


async def add_one(url: str, prefix: str, event: Interaction) -> None:
    store = RedisProfileStore.from_url(url, prefix=prefix)
    try:
        assert await store.add([event]) == 1
    finally:
        await store.close()


class _Epochs:
    """The epoch keys of one Redis, shared by the processes of a test; ``fail_merges``: how
    many merges fail (Redis gone mid-merge)."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.loaded, self.merges, self.fail_merges = False, 0, 0

    async def read_epoch(self) -> str | None:
        return self.epoch

    async def claim_epoch(self, token: str) -> str:
        self.epoch = self.epoch or token
        return self.epoch

    async def histories_loaded(self) -> bool:
        return self.loaded

    async def mark_histories_loaded(self) -> None:
        self.loaded = True

    async def merge(self, histories: Any, times: Any = None) -> None:
        if self.fail_merges:
            self.fail_merges -= 1
            raise StoreUnavailable("Redis went away mid-merge")
        self.merges += 1

    def flush(self) -> None:
        self.epoch, self.loaded = None, False


def test_histories_go_into_a_data_set_once_and_come_back_after_a_loss() -> None:
    """A replacement worker loaded the histories again over the live profiles (0 of 300 users'
    events survived); after FLUSHALL the worker without histories claimed the recovery and
    nothing came back, while /readyz said "another instance reloads the profiles"."""
    redis = _Epochs()
    loader = EpochWatch(redis, histories={"3": [1, 2]}, clock=lambda: 0.0)
    other = EpochWatch(redis, histories=None, clock=lambda: 0.0)
    asyncio.run(other.start())  # the one without histories may start first
    asyncio.run(loader.start())
    assert redis.merges == 1 and redis.loaded
    replacement = EpochWatch(redis, histories={"3": [1, 2]})
    asyncio.run(replacement.start())  # a worker restarted: the data set has them already
    assert redis.merges == 1

    redis.flush()
    redis.fail_merges = 1
    asyncio.run(other.check())  # it notices first and writes the new epoch
    assert other.lost is not None and "came back empty" in other.lost
    assert "started without the dataset's histories" in other.lost
    asyncio.run(loader.check())  # the merge fails: reported once, retried
    assert loader.losses == 1 and redis.merges == 1 and not redis.loaded
    assert loader.lost is not None and "another data set" in loader.lost
    asyncio.run(loader.check())
    assert loader.losses == 1 and redis.merges == 2 and redis.loaded
    assert loader.lost.endswith("profiles of 1 users merged back")
    for watch in (other, loader, replacement):
        asyncio.run(watch.check())
    assert (other.losses, loader.losses, replacement.losses, redis.merges) == (1, 1, 1, 2)


@pytest.mark.parametrize("source", [True, False], ids=["with-histories", "without"])
def test_a_service_starts_while_redis_is_down_and_catches_up(
    catalogue: Catalogue, tmp_path: Path, source: bool
) -> None:
    """Start-up read the added items and the epoch from Redis and raised: a restart during an
    outage crash-looped instead of serving degraded reads as a running process does."""
    server = RedisServer(tmp_path, fsync="off")  # not started yet
    settings = catalogue.settings.model_copy(
        update={"redis_url": server.url, "redis_prefix": "late", "redis_timeout_ms": TIMEOUT_MS}
    )
    app = create_app(settings, profiles=catalogue.histories if source else None)
    try:
        with TestClient(app) as client:
            ready = client.get("/readyz").json()
            assert ready["degraded"] is True and ready["data_lost"] is None
            answer = client.get("/recommend/3")
            assert answer.status_code == 200 and answer.json()["degraded"] is True
            server.start()
            redis = server.client()
            profile_key = user_keys("late", "3").profile
            for _ in range(50):  # the epoch check runs every second
                time.sleep(0.2)
                ready = client.get("/readyz").json()
                set_up = redis.exists("late:epoch") and (redis.exists(profile_key) or not source)
                if not ready["degraded"] and set_up:
                    break
            assert ready["degraded"] is False and ready["data_lost"] is None  # no false alarm
            assert redis.get("late:epoch") is not None  # the data set is set up
            if source:  # merged in once Redis answered
                assert stored(server, "late", "3")[0].seen == set(catalogue.histories["3"])
            answer = client.get("/recommend/3", params={"k": 50}).json()
            assert answer["degraded"] is False
            seen = set(catalogue.histories["3"]) if source else set()
            assert not seen & {i["item_id"] for i in answer["items"]}  # its history is known
            redis.close()
    finally:
        server.kill()
