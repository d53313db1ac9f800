"""One suite for both profile stores, the Redis one on a real server (127.0.0.1:6379).

Each Redis test gets its own random key prefix and deletes it afterwards. Tests drive the async
API with ``asyncio.run`` (no plugin); a Redis client is bound to the loop that first used it, so
each test opens and closes its store inside that one loop.
"""

from __future__ import annotations

import asyncio
import csv
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from service.store.codec import decode_profile, encode_profile
from service.store.memory import MemoryProfileStore
from service.store.profiles import MAX_ITEM_ID, EventConflict, Interaction, Profile, ProfileStore
from service.store.redis.client import redis_client
from service.store.redis.profiles import RedisProfileStore, user_keys
from service.store.resilient import ResilientStore

REDIS_URL = "redis://127.0.0.1:6379/0"
HOSTILE_IDS = ["a}b", "a%7Db", "x:{y}", "x:", "", "%", "{", "}", "ü 🙂"]
# Varint edges (1, 2 and 3 bytes), 0, and ids far beyond any catalogue.
EDGE_IDS = [0, 1, 127, 128, 129, 2**14 - 1, 2**14, 2**21, 2**40, MAX_ITEM_ID - 1, MAX_ITEM_ID]


class Runner(Protocol):
    def __call__(self, scenario: Callable[[Any], Awaitable[None]], **options: Any) -> None: ...


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def last_distinct(sequence: list[int], n: int = 9) -> list[int]:
    """Slow reference: items whose occurrence is their last one, in order, then the last n."""
    return [x for k, x in enumerate(sequence) if x not in sequence[k + 1 :]][-n:]


def random_ids(rng: random.Random, n: int) -> list[int]:
    """Ids from a mix of scales: small catalogues (one-byte gaps), large ones, and the edges."""
    pools = [range(20), range(2000), range(2**40, 2**40 + 10**6), EDGE_IDS]
    return [rng.choice(rng.choice(pools)) for _ in range(n)]


def ml100k_histories(root: Path) -> dict[str, list[int]]:
    """Every user's item ids, oldest first (ties in file order), as ``bootstrap.histories``."""
    with (root / "interactions.csv").open(newline="") as f:
        rows = sorted(
            (int(row["timestamp"]), k, row["user_id"], int(row["item_id"]))
            for k, row in enumerate(csv.DictReader(f))
        )
    histories: dict[str, list[int]] = {}
    for _, _, user, item in rows:
        histories.setdefault(user, []).append(item)
    return histories


def events(user: str, items: list[int], ids: str | None = None) -> list[Interaction]:
    """One event per item; ``ids`` names event ids ``{ids}-{k}`` by position."""
    return [
        Interaction(user, item, event_id=None if ids is None else f"{ids}-{k}")
        for k, item in enumerate(items)
    ]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def redis_up() -> None:
    # Never skip: a suite that silently skips Redis would pass with the Redis store broken.
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        pytest.fail(
            f"these tests need a Redis server at {REDIS_URL} ({error}); start one, e.g. "
            "`redis-server --save '' --appendonly no`",
            pytrace=False,
        )
    finally:
        client.close()


async def _delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)


@asynccontextmanager
async def open_redis(**options: Any) -> AsyncIterator[RedisProfileStore]:
    prefix = f"test-profiles-{uuid.uuid4().hex[:12]}"
    store = RedisProfileStore(redis_client(REDIS_URL), prefix=prefix, **options)
    cleaner = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield store
    finally:
        await _delete_prefix(cleaner, prefix)
        await cleaner.aclose()
        await store.close()


@asynccontextmanager
async def open_memory(**options: Any) -> AsyncIterator[MemoryProfileStore]:
    store = MemoryProfileStore(**options)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def open_resilient(**options: Any) -> AsyncIterator[ResilientStore]:
    """The Redis store behind the cache that serves reads during outages: it must keep the
    contract while Redis answers (its cache filled on every read and write)."""
    async with open_redis(**options) as store:
        yield ResilientStore(store, cache_size=1000)


def _runner(opener: Callable[..., AbstractAsyncContextManager[Any]]) -> Runner:
    def run(scenario: Callable[[Any], Awaitable[None]], **options: Any) -> None:
        async def main() -> None:
            async with opener(**options) as store:
                await scenario(store)

        asyncio.run(main())

    return run


@pytest.fixture(params=["memory", "redis", "resilient"])
def with_store(request: pytest.FixtureRequest) -> Runner:
    """Runs an async scenario against a fresh store of each kind."""
    if request.param == "memory":
        return _runner(open_memory)
    request.getfixturevalue("redis_up")
    return _runner(open_redis if request.param == "redis" else open_resilient)


@pytest.fixture
def with_redis(redis_up: None) -> Runner:
    return _runner(open_redis)


# --------------------------------------------------------------------------- the shared contract


def test_unknown_user_has_an_empty_profile(with_store: Runner) -> None:
    async def scenario(store: ProfileStore) -> None:
        await store.add(events("known", [1]))
        assert await store.recent(["nobody", "known"]) == [[], [1]]
        assert await store.seen(["nobody", "known"]) == [set(), {1}]
        assert await store.recent([]) == []
        assert await store.seen([]) == []
        assert await store.add([]) == 0

    with_store(scenario)


def test_recent_is_oldest_first_and_capped(with_store: Runner) -> None:
    async def scenario(store: ProfileStore) -> None:
        assert await store.add(events("u", list(range(1, 13)))) == 12
        await store.add(events("short", [30, 10, 20]))
        assert await store.recent(["u", "short"]) == [list(range(4, 13)), [30, 10, 20]]
        assert await store.seen(["u"]) == [set(range(1, 13))]

    assert MemoryProfileStore().max_recent == 9
    with_store(scenario)


def test_max_recent_is_configurable(with_store: Runner) -> None:
    async def scenario(store: ProfileStore) -> None:
        await store.add(events("u", [1, 2, 3, 4]))
        await store.load({"v": [5, 6, 7]})
        assert await store.recent(["u", "v"]) == [[3, 4], [6, 7]]

    with_store(scenario, max_recent=2)


def test_reinteraction_moves_the_item_to_newest(with_store: Runner) -> None:
    async def scenario(store: ProfileStore) -> None:
        await store.add(events("u", list(range(1, 10))))
        await store.add(events("u", [1]))  # the oldest comes back: nothing is evicted
        assert await store.recent(["u"]) == [[2, 3, 4, 5, 6, 7, 8, 9, 1]]
        await store.add(events("u", [10]))  # so 2, not 1, is the one to go
        assert await store.recent(["u"]) == [[3, 4, 5, 6, 7, 8, 9, 1, 10]]
        await store.add(events("u", [7, 3, 7]))  # repeats inside one batch too
        assert await store.recent(["u"]) == [[4, 5, 6, 8, 9, 1, 10, 3, 7]]
        assert await store.seen(["u"]) == [set(range(1, 11))]

    with_store(scenario)


def test_replayed_event_ids_are_applied_once(with_store: Runner) -> None:
    batch = [
        Interaction("a", 1, event_id="e1"),
        Interaction("b", 2, event_id="e1"),  # the same id for another user is another event
        Interaction("a", 3, event_id="e2"),
        Interaction("a", 1, event_id="e3"),
        Interaction("a", 3, event_id="e2"),  # a retry inside the batch itself
    ]

    async def scenario(store: ProfileStore) -> None:
        assert await store.add(batch) == 4
        before = (await store.recent(["a", "b"]), await store.seen(["a", "b"]))
        assert before == ([[3, 1], [2]], [{1, 3}, {2}])
        assert await store.add(batch) == 0
        assert await store.add(list(reversed(batch))) == 0
        assert (await store.recent(["a", "b"]), await store.seen(["a", "b"])) == before
        # Without an id an event cannot be recognised, so it is applied again.
        assert await store.add([Interaction("a", 3), Interaction("a", 3, event_id="")]) == 2
        assert await store.recent(["a"]) == [[1, 3]]

    with_store(scenario)


def test_recent_items_follow_event_time_ties_by_arrival(with_store: Runner) -> None:
    """An event sent late with an older time takes its place in time, not the newest one."""

    async def scenario(store: ProfileStore) -> None:
        await store.add([Interaction("u", i, 1000.0 + i) for i in range(1, 10)])  # 1..9
        await store.add([Interaction("u", 50, 1004.5)])  # late: between 4 and 5
        assert await store.recent(["u"]) == [[2, 3, 4, 50, 5, 6, 7, 8, 9]]
        await store.add([Interaction("u", 60, 10.0)])  # older than all nine: seen only
        assert await store.recent(["u"]) == [[2, 3, 4, 50, 5, 6, 7, 8, 9]]
        assert 60 in (await store.seen(["u"]))[0]
        await store.add([Interaction("u", 8, 1001.0)])  # an older event of a later item
        assert await store.recent(["u"]) == [[2, 3, 4, 50, 5, 6, 7, 8, 9]]
        await store.add([Interaction("u", 3, 1009.0)])  # a tie with 9: after it, by arrival
        assert await store.recent(["u"]) == [[2, 4, 50, 5, 6, 7, 8, 9, 3]]
        await store.add([Interaction("u", 70)])  # no time: now, later than all of these
        assert (await store.recent(["u"]))[0][-1] == 70

    with_store(scenario, clock=FakeClock(2_000_000.0))


def test_an_event_id_reused_for_another_event_is_refused_whole(with_store: Runner) -> None:
    async def scenario(store: ProfileStore) -> None:
        assert await store.add([Interaction("u", 1, 5.0, "e1")]) == 1
        before = await store.profiles(["u", "v"])
        for batch in (
            [Interaction("v", 7, None, "v1"), Interaction("u", 2, 5.0, "e1")],  # another item
            [Interaction("u", 1, 6.0, "e1")],  # another time
            [Interaction("u", 1, None, "e1")],  # no time where one was given
            [Interaction("u", 3, None, "e2"), Interaction("u", 4, None, "e2")],  # in one call
        ):
            with pytest.raises(EventConflict) as refused:
                await store.add(batch)
            assert refused.value.event_ids in (["e1"], ["e2"])
            assert await store.profiles(["u", "v"]) == before  # nothing applied, v's neither
        assert await store.add([Interaction("u", 1, 5.0, "e1")]) == 0  # a true retry: fine
        assert (
            await store.add([Interaction("u", 1, 5.0, "e1"), Interaction("u", 1, 5.0, "e1")]) == 0
        )

    with_store(scenario)


def test_event_ids_are_forgotten_after_their_ttl(with_store: Runner) -> None:
    clock = FakeClock()

    async def scenario(store: ProfileStore) -> None:
        await store.add([Interaction("u", 1, event_id="e"), Interaction("u", 2)])
        clock.now += 99
        assert await store.add([Interaction("u", 1, event_id="e")]) == 0
        clock.now += 2  # 101 s after the first add
        assert await store.add([Interaction("u", 1, event_id="e")]) == 1
        assert await store.recent(["u"]) == [[2, 1]]
        assert await store.add([Interaction("u", 1, event_id="e")]) == 0  # remembered anew

    with_store(scenario, event_ttl_s=100, clock=clock)


def test_a_users_event_id_log_keeps_the_newest_ids_only(with_store: Runner) -> None:
    """It was bounded by the TTL alone: 1.87 M ids on one user in 40 s took 748 MiB."""
    clock = FakeClock()

    async def scenario(store: ProfileStore) -> None:
        for batch in range(3):  # 12 ids, in calls of 4, a second apart
            events = [Interaction("u", 1, event_id=f"e{batch * 4 + j}") for j in range(4)]
            assert await store.add(events) == 4
            clock.now += 1
        assert await store.add([Interaction("u", 1, event_id="e2")]) == 0  # still logged
        assert await store.add([Interaction("u", 1, event_id="e1")]) == 1  # the oldest two
        assert await store.add([Interaction("u", 1, event_id="e0")]) == 1  # are forgotten
        assert await store.add([Interaction("v", 1, event_id="e0")]) == 1  # per user
        if isinstance(store, RedisProfileStore):  # and forgotten in Redis, payloads too
            client = redis.Redis.from_url(REDIS_URL)
            keys = user_keys(store.prefix, "u")
            assert client.zcard(keys.events) == 10 and client.hlen(keys.payloads) == 10
            client.close()

    with_store(scenario, max_event_ids=10, clock=clock)


def test_events_of_several_users_in_one_call(with_store: Runner) -> None:
    rng = random.Random(0)
    users = ["a", "b", "c", "d"]
    stream = [Interaction(rng.choice(users), rng.randint(1, 15)) for _ in range(300)]

    async def scenario(store: ProfileStore) -> None:
        await store.add(stream[:100])
        for k in range(100, 300, 37):  # ragged batches: batch results == one big batch
            assert await store.add(stream[k : k + 37]) == len(stream[k : k + 37])
        for user, recent, seen in zip(
            users, await store.recent(users), await store.seen(users), strict=True
        ):
            mine = [e.item_id for e in stream if e.user_id == user]
            assert recent == last_distinct(mine)
            assert seen == set(mine)

    with_store(scenario)


def test_load_replaces_profiles(with_store: Runner) -> None:
    rng = random.Random(1)
    history = [rng.randint(1, 40) for _ in range(100)]  # many re-interactions

    async def scenario(store: ProfileStore) -> None:
        await store.add(events("a", [500, 501]) + events("kept", [7]))
        await store.load({"a": history, "b": [], "c": [5, 6, 5]})
        assert await store.recent(["a", "b", "c", "kept"]) == [
            last_distinct(history),
            [],
            [6, 5],
            [7],
        ]
        assert await store.seen(["a", "b", "c", "kept"]) == [set(history), set(), {5, 6}, {7}]
        # Loading a history leaves what replaying it event by event leaves.
        await store.add(events("replayed", history))
        assert await store.recent(["replayed"]) == await store.recent(["a"])

    with_store(scenario)


def test_a_history_loads_at_its_times(with_store: Runner) -> None:
    """Loaded with their times, a history's items keep them (each its latest), a live event is
    placed among them by its time, and times that are not one per item, oldest first, are
    refused whole; a history loaded without times is at 0."""
    history, times = [5, 6, 5, 7], [100.0, 200.5, 300.0, 400.0]

    async def scenario(store: ProfileStore) -> None:
        await store.load({"a": history, "b": [8, 9]}, {"a": times})
        a, b = await store.profiles(["a", "b"])
        assert (a.recent, a.times, a.seconds) == (
            [6, 5, 7],
            (200_500, 300_000, 400_000),
            [200.5, 300.0, 400.0],
        )
        assert b.times == (0, 0)
        await store.add([Interaction("a", 6, 350.0)])
        assert await store.recent(["a"]) == [[5, 6, 7]]
        for bad in ([100.0, 200.0, 300.0], [400.0, 300.0, 200.0, 100.0], [-1.0, 0.0, 0.0, 0.0]):
            with pytest.raises(ValueError, match="times"):
                await store.load({"c": [1], "a": history}, {"a": bad})
        assert await store.recent(["a", "c"]) == [[5, 6, 7], []]

    with_store(scenario)


def test_a_merge_adds_a_history_at_its_times(with_redis: Runner) -> None:
    async def scenario(store: RedisProfileStore) -> None:
        await store.add([Interaction("a", 1, 1000.0)])  # live, before the histories come in
        await store.merge({"a": [2, 3], "b": [4]}, {"a": [500.0, 1500.0]})
        a, b = await store.profiles(["a", "b"])
        assert (a.recent, a.times) == ([2, 1, 3], (500_000, 1_000_000, 1_500_000))
        assert (b.recent, b.times) == ([4], (0,))

    with_redis(scenario)


def test_load_many_users(with_store: Runner) -> None:
    rng = random.Random(2)
    histories = {f"user-{u}": [rng.randint(1, 1682) for _ in range(100)] for u in range(1000)}
    sample = [f"user-{u}" for u in (0, 1, 499, 500, 998, 999)]  # either side of a batch edge

    async def scenario(store: ProfileStore) -> None:
        await store.load(histories)
        assert await store.recent(sample) == [last_distinct(histories[u]) for u in sample]
        assert await store.seen(sample) == [set(histories[u]) for u in sample]
        assert len(await store.recent(list(histories))) == 1000

    with_store(scenario)


def test_concurrent_adds_for_one_user(with_store: Runner) -> None:
    items = list(range(100, 150))

    async def scenario(store: ProfileStore) -> None:
        done = asyncio.Event()
        snapshots = 0

        async def watch() -> None:
            # No reader may see half an update: an overlong list, a duplicate, or an item
            # already in `recent` but not yet in `seen`.
            nonlocal snapshots
            while not done.is_set():
                (recent,) = await store.recent(["u"])
                (seen,) = await store.seen(["u"])
                (profile,) = await store.profiles(["u"])  # one snapshot of both
                for r, s in ((recent, seen), (profile.recent, profile.seen)):
                    assert len(r) <= 9
                    assert len(set(r)) == len(r)
                    assert set(r) <= s
                snapshots += 1
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        # Each event twice, at once: a check-then-write race would apply some twice.
        calls = [store.add(events("u", [i], ids=f"c{i}")) for i in items for _ in range(2)]
        applied = await asyncio.gather(*calls)
        done.set()
        await watcher
        assert sum(applied) == len(items)
        assert snapshots > 0
        (recent,) = await store.recent(["u"])
        assert len(recent) == 9
        assert set(recent) <= set(items)
        assert await store.seen(["u"]) == [set(items)]

    with_store(scenario)


def test_hostile_user_ids_are_distinct_users(with_store: Runner) -> None:
    async def scenario(store: ProfileStore) -> None:
        batch = [Interaction(u, k, event_id="e") for k, u in enumerate(HOSTILE_IDS)]
        assert await store.add(batch) == len(HOSTILE_IDS)
        assert await store.recent(HOSTILE_IDS) == [[k] for k in range(len(HOSTILE_IDS))]
        await store.load({"a}b": [40, 41]})
        assert await store.seen(["a}b", "a%7Db"]) == [{40, 41}, {1}]

    with_store(scenario)


def test_numpy_item_ids_are_accepted(with_store: Runner) -> None:
    async def scenario(store: ProfileStore) -> None:
        await store.add([Interaction("n", np.int64(5), event_id="e")])  # type: ignore[arg-type]
        await store.load({"m": np.array([3, 4, 3])})  # type: ignore[dict-item]
        assert await store.recent(["n", "m"]) == [[5], [4, 3]]
        assert all(type(i) is int for i in (await store.seen(["m"]))[0])

    with_store(scenario)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_recent"):
        MemoryProfileStore(max_recent=0)
    with pytest.raises(ValueError, match="event_ttl_s"):
        MemoryProfileStore(event_ttl_s=0)
    client = aioredis.Redis.from_url(REDIS_URL)  # connects lazily: no server needed here
    with pytest.raises(ValueError, match="braces"):
        RedisProfileStore(client, prefix="vis{rec}")
    with pytest.raises(ValueError, match="max_recent"):
        RedisProfileStore(client, max_recent=0)


def test_profiles_match_recent_and_seen(with_store: Runner) -> None:
    rng = random.Random(4)
    users = ["a", "b", "c", "nobody"]

    async def scenario(store: ProfileStore) -> None:
        await store.load({"a": random_ids(rng, 50), "b": [7]})
        await store.add([Interaction(rng.choice(users[:3]), i) for i in random_ids(rng, 60)])
        got = await store.profiles(users)
        recent, seen = await store.recent(users), await store.seen(users)
        assert got == [Profile(r, frozenset(s)) for r, s in zip(recent, seen, strict=True)]
        assert got[3] == Profile([], frozenset())
        assert all(set(p.recent) <= p.seen and len(p.recent) <= 9 for p in got)
        assert await store.profiles([]) == []

    with_store(scenario)


def test_edge_item_ids(with_store: Runner) -> None:
    async def scenario(store: ProfileStore) -> None:
        await store.add(events("u", list(reversed(EDGE_IDS))))
        await store.load({"v": [*EDGE_IDS, 5, 0]})
        await store.add(events("v", [2**40 + 1, 3]))  # inserted between stored ids
        u, v = await store.profiles(["u", "v"])
        assert u == Profile(list(reversed(EDGE_IDS))[-9:], frozenset(EDGE_IDS))
        assert v.recent == [*EDGE_IDS[-6:], 5, 0, 2**40 + 1, 3][-9:]
        assert v.seen == {*EDGE_IDS, 5, 2**40 + 1, 3}
        assert all(type(i) is int for i in [*v.recent, *v.seen])

    with_store(scenario)


@pytest.mark.parametrize("bad", [-1, -(2**40), MAX_ITEM_ID + 1, 2**64])
def test_out_of_range_item_ids_are_refused(with_store: Runner, bad: int) -> None:
    async def scenario(store: ProfileStore) -> None:
        await store.add(events("u", [1]))
        with pytest.raises(ValueError, match="item ids"):
            await store.add([Interaction("u", 2), Interaction("w", bad)])
        with pytest.raises(ValueError, match="item ids"):
            await store.load({"u": [3], "w": [4, bad]})
        # Nothing of a refused call is applied, for any user.
        assert await store.profiles(["u", "w"]) == [
            Profile([1], frozenset({1})),
            Profile([], frozenset()),
        ]

    with_store(scenario)


def test_non_integer_item_ids_are_refused(with_store: Runner) -> None:
    async def scenario(store: ProfileStore) -> None:
        with pytest.raises(TypeError):
            await store.add([Interaction("u", 1.5)])  # type: ignore[arg-type]
        assert await store.recent(["u"]) == [[]]

    with_store(scenario)


# --------------------------------------------------------------------------- the encoding


def test_encoding_round_trips() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        seen = random_ids(rng, rng.randint(1, 60))
        recent = rng.sample(seen, min(len(set(seen)), rng.randint(0, 9)))
        recent = list(dict.fromkeys(recent))
        times = sorted(rng.choice([0, rng.randrange(2**42)]) for _ in recent)
        data = encode_profile(recent, seen, times)
        decoded = decode_profile(data)
        assert decoded == Profile(recent, frozenset(seen))
        assert decoded.times == tuple(times)
    assert encode_profile([], []) == b""
    assert decode_profile(b"") == decode_profile(None) == Profile([], frozenset())


def test_profiles_stored_before_event_times_are_read() -> None:
    """The first format (no times, no marker byte) still decodes: its items are old, time 0."""
    v1 = bytes([2, 0xAC, 0x02, 5, 5, 0xA7, 0x02])  # recent [300, 5], seen {5, 300}
    assert decode_profile(v1) == Profile([300, 5], frozenset({5, 300}))
    assert decode_profile(v1).times == (0, 0)


def test_encoding_is_varints_of_gaps() -> None:
    # The marker, n=2, recent 300 (2 bytes) and 5, their times 1000 and 1000 + 5 ms as 1000
    # (2 bytes) and the gap 5, then seen 5, 300 as gaps 5 and 295 (2 bytes).
    assert encode_profile([300, 5], [300, 5, 5], [1000, 1005]) == bytes(
        [0xFE, 2, 0xAC, 0x02, 5, 0xE8, 0x07, 5, 5, 0xA7, 0x02]
    )
    # Gaps below 128 take one byte whatever the ids: 100 ids near 2**40, about 100 bytes.
    seen = range(2**40, 2**40 + 100 * 16, 16)
    assert len(encode_profile([], seen)) == 2 + 6 + 99


# --------------------------------------------------------------------------- in-process only


def test_memory_store_applies_concurrent_adds_in_call_order() -> None:
    async def scenario(store: MemoryProfileStore) -> None:
        items = list(range(50))
        await asyncio.gather(*(store.add(events("u", [i])) for i in items))
        assert await store.recent(["u"]) == [items[-9:]]

    _runner(open_memory)(scenario)


# --------------------------------------------------------------------------- Redis only


def test_redis_keeps_the_last_nine_in_server_order(with_redis: Runner) -> None:
    """50 adds at once over one pool, all at one time: `recent` holds the last 9 the server
    ran, in that order (ties in time go by arrival; MONITOR reports commands in the order the
    server executes them)."""
    items = list(range(200, 250))

    async def scenario(store: RedisProfileStore) -> None:
        watcher = aioredis.Redis.from_url(REDIS_URL)
        profile_key = store.keys("u").profile
        order: list[int] = []
        connections: set[str] = set()
        try:
            async with watcher.monitor() as monitor:
                await asyncio.gather(*(store.add(events("u", [i], ids=f"cc{i}")) for i in items))
                sentinel = f"sentinel-{uuid.uuid4().hex}"
                await watcher.echo(sentinel)
                while sentinel not in (line := await monitor.next_command())["command"]:
                    command = line["command"]
                    if command.startswith("EVAL") and profile_key in command:
                        order.append(int(re.findall(r"\bcc(\d+)-0\b", command)[0]))
                        connections.add(line["client_port"])
        finally:
            await watcher.aclose()
        assert sorted(order) == items
        assert len(connections) > 1, "the adds did not run concurrently"
        assert await store.recent(["u"]) == [order[-9:]]

    with_redis(scenario, clock=FakeClock())


def test_redis_keys_of_a_user_share_one_slot(with_redis: Runner) -> None:
    async def scenario(store: RedisProfileStore) -> None:
        users = ["alice", *HOSTILE_IDS]
        # Event ids make the third key (the event log) exist too.
        await store.add([Interaction(u, 1, event_id="e") for u in users])
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            found = {key async for key in client.scan_iter(match=f"{store.prefix}:*")}
        finally:
            await client.aclose()
        expected = [store.keys(u).all for u in users]
        assert found == {key for keys in expected for key in keys}  # no collisions either
        for keys in expected:
            tags = {key.split("{", 1)[1].split("}", 1)[0] for key in keys}  # as Redis reads it
            assert len(tags) == 1 and next(iter(tags)).startswith("u:")
            assert len({key_slot(key.encode()) for key in keys}) == 1
        assert store.keys("alice").all == (
            f"{store.prefix}:{{u:alice}}:p",
            f"{store.prefix}:{{u:alice}}:ev",
            f"{store.prefix}:{{u:alice}}:evp",
        )

    with_redis(scenario)


def test_user_key_encoding_is_one_to_one() -> None:
    ids = [*HOSTILE_IDS, "alice", "a", "a:p", "u:a", "a}:ev"]
    bases = {user_keys("p", u).profile for u in ids}
    assert len(bases) == len(ids)
    for u in ids:
        body = user_keys("p", u).profile[len("p:{") : -len("}:p")]
        assert "{" not in body and "}" not in body


def test_redis_memory_per_user(with_redis: Runner) -> None:
    rng = random.Random(3)
    histories = {f"m{u}": rng.sample(range(1, 1683), 100) for u in range(20)}

    async def scenario(store: RedisProfileStore) -> None:
        await store.load(histories)
        per_user = await store.memory_per_user(list(histories))
        # 9 recent + 100 seen ids: a few hundred bytes; kilobytes would mean a bloated layout.
        assert 100 < per_user < 1024
        assert await store.memory_per_user(["nobody"]) == 0
        # The event log is the user's too, and counted.
        before = await store.memory_per_user(["m0"])
        await store.add([Interaction("m0", 1, event_id="e")])
        assert await store.memory_per_user(["m0"]) > before + 50
        with pytest.raises(ValueError, match="at least one"):
            await store.memory_per_user([])

    with_redis(scenario)


def test_redis_ping(with_redis: Runner) -> None:
    async def scenario(store: RedisProfileStore) -> None:
        assert await store.ping()
        # Port 1 has no server: ping reports it instead of raising.
        down = RedisProfileStore.from_url("redis://127.0.0.1:1", timeout_s=0.5)
        try:
            assert not await down.ping()
        finally:
            await down.close()

    with_redis(scenario)


def test_redis_memory_per_user_on_ml100k(with_redis: Runner, ml100k: Path) -> None:
    """The goal: <= 0.25 GiB per million users, i.e. <= 268 bytes a user, on real histories
    (about 106 items a user), with this suite's prefix (20 bytes longer than ``visrec``)."""
    histories = ml100k_histories(ml100k)
    assert len(histories) == 943

    async def scenario(store: RedisProfileStore) -> None:
        await store.load(histories)
        assert await store.memory_per_user(list(histories)) <= 2**30 / 4 / 1e6
        sample = ["1", "13", "405"]  # 405 has the longest history
        assert await store.recent(sample) == [last_distinct(histories[u]) for u in sample]
        assert await store.seen(sample) == [set(histories[u]) for u in sample]

    with_redis(scenario)


def test_redis_matches_memory_on_random_streams(with_redis: Runner) -> None:
    """Both stores, same random loads and adds (ids of every scale, inserts anywhere in long
    seen lists): same profiles, and the script writes byte for byte what ``load`` writes."""
    rng = random.Random(6)
    users = [f"r{k}" for k in range(12)]

    clock = FakeClock()

    async def scenario(store: RedisProfileStore) -> None:
        memory = MemoryProfileStore(clock=clock)
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            for step in range(300):
                if step % 25 == 0:
                    histories = {u: random_ids(rng, rng.randint(0, 400)) for u in users[:4]}
                    await store.load(histories)
                    await memory.load(histories)
                clock.now += rng.choice([0, 0.0004, 1])
                batch = [  # late, early, and untimed events; times in whole ms, as stored
                    Interaction(rng.choice(users), i, rng.choice([None, rng.randrange(10**6)]))
                    for i in random_ids(rng, 8)
                ]
                assert await store.add(batch) == await memory.add(batch)
            expected = await memory.profiles(users)
            assert await store.profiles(users) == expected
            for user, profile in zip(users, expected, strict=True):
                stored = await client.get(store.keys(user).profile)
                blob = encode_profile(profile.recent, profile.seen, profile.times)
                assert stored == (blob or None)
        finally:
            await client.aclose()

    with_redis(scenario, clock=clock)


def test_redis_profiles_is_one_round_trip(
    with_redis: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends: list[bytes] = []
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        sends.append(command if isinstance(command, bytes) else b"".join(command))
        await original(self, command, check_health)

    async def scenario(store: RedisProfileStore) -> None:
        await store.load({"a": [1, 2], "b": [3]})
        await store.ping()  # the connection's handshake happens here, not below
        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
        profiles = await store.profiles(["a", "b", "nobody"])
        monkeypatch.undo()
        assert profiles == [
            Profile([1, 2], frozenset({1, 2})),
            Profile([3], frozenset({3})),
            Profile([], frozenset()),
        ]
        assert len(sends) == 1  # one write, then its replies: one round trip
        assert sends[0].count(b"GET") == 3

    with_redis(scenario)


def test_redis_refuses_a_decoding_client() -> None:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)  # connects lazily
    with pytest.raises(ValueError, match="decode"):
        RedisProfileStore(client)


def test_memory_store_keeps_the_most_recent_users_within_its_bound() -> None:
    evictions: list[int] = []

    async def scenario(store: MemoryProfileStore) -> None:
        for user in ("a", "b", "c"):
            await store.add(events(user, [1]))
        await store.profiles(["a"])  # a is now more recent than b
        await store.add(events("d", [2]))
        assert store.evicted == 1 and len(evictions) == 1
        found = await store.profiles(["a", "b", "c", "d"])
        assert [bool(p.seen) for p in found] == [True, False, True, True]  # b was forgotten
        await store.load({"e": [3], "f": [4]})
        assert store.evicted == 3 and len(store._profiles) == 3

    _runner(open_memory)(scenario, max_users=3, on_evict=lambda: evictions.append(1))
    with pytest.raises(ValueError, match="max_users"):
        MemoryProfileStore(max_users=0)


def test_memory_store_writes_do_not_copy_a_users_event_log() -> None:
    """One write to a user with 300k logged event ids took 267 ms on the event loop: it
    rebuilt the user's whole id dict to drop expired ids. Now expired ids leave from the front
    and the log is changed in place."""
    clock = FakeClock()

    async def scenario(store: MemoryProfileStore) -> None:
        await store.add([Interaction("u", k % 50, None, f"old-{k}") for k in range(1000)])
        clock.now += 50
        await store.add([Interaction("u", k % 50, None, f"new-{k}") for k in range(1000)])
        log = store._profiles["u"].events
        clock.now += 60  # the first 1,000 ids are now older than the TTL, the others not
        assert await store.add([Interaction("u", 1, None, "newest")]) == 1
        assert store._profiles["u"].events is log  # the same dict, changed in place
        assert len(log) == 1001 and next(iter(log)) == "new-0"
        assert await store.add([Interaction("u", 1, None, "old-0")]) == 1  # forgotten: new

    _runner(open_memory)(scenario, event_ttl_s=100, clock=clock)
