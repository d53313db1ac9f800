"""Events from a Redis Stream (issue 25): applied as POST /interactions applies them, each once,
through dead consumers and redeliveries; poison entries dead-lettered with their reason."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from harness.redis_servers import REDIS, redis_prefix
from harness.streams import group, replayed, start_consumer, stored
from service.ingest import GROUP, Consumer, stream_keys
from service.model.feature_store import load_features
from service.store.profiles import Interaction
from service.store.redis.profiles import RedisProfileStore

KNOWN = frozenset(range(1, 51))


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix("ingest") as name:
        yield name


def _events(n: int, seed: int = 0, known: frozenset[int] = KNOWN) -> list[dict[str, str]]:
    """Events of 12 users in time order; a third with event ids of their own."""
    rng = np.random.default_rng(seed)
    items = sorted(known)
    out = []
    for i in range(n):
        event = {
            "user_id": f"u{rng.integers(12)}",
            "item_id": str(items[rng.integers(len(items))]),
            "timestamp": str(1_700_000_000 + i),
        }
        if i % 3 == 0:
            event["event_id"] = f"e{i}"
        out.append(event)
    return out


def test_every_event_applies_once_through_a_dead_consumer_and_redeliveries(prefix: str) -> None:
    events = _events(600)
    stream, _ = stream_keys(prefix)

    async def run() -> tuple[int, int]:
        client = aioredis.Redis.from_url(REDIS)
        store = RedisProfileStore.from_url(REDIS, prefix=prefix)
        live = Consumer(client, store, prefix, "live", lambda: KNOWN, batch=100, block_ms=10)
        live.claim_idle_ms = 200
        await live.setup()
        async with client.pipeline(transaction=False) as pipe:
            for e in events:
                pipe.xadd(stream, e)  # type: ignore[arg-type]
            await pipe.execute()
        # a consumer takes 150 entries and dies before acknowledging any
        await client.xreadgroup(GROUP, "dead", {stream: ">"}, count=150)
        # another applies 100 but dies before acknowledging them (a redelivery after apply)
        taken = await client.xreadgroup(GROUP, "late", {stream: ">"}, count=100)
        half_done = [(i.decode(), {k.decode(): v.decode() for k, v in f.items()})
                     for i, f in taken[0][1]]  # fmt: skip
        await store.add([Interaction(f["user_id"], int(f["item_id"]), float(f["timestamp"]),
                         f.get("event_id") or f"stream:{i}") for i, f in half_done])  # fmt: skip
        deadline = time.monotonic() + 20
        while await live.step() or (await client.xpending(stream, GROUP))["pending"]:
            assert time.monotonic() < deadline, "entries left pending"
            await asyncio.sleep(0.05)
        await store.close()
        await client.aclose()
        return live.applied, live.dead

    applied, dead = asyncio.run(run())
    users = sorted({e["user_id"] for e in events})
    assert stored(REDIS, prefix, users) == replayed(events)  # recent and seen items
    assert dead == 0 and applied == len(events) - 100  # the late consumer's were not again


def test_entries_that_can_never_apply_are_dead_lettered_with_their_reason(prefix: str) -> None:
    stream, letters = stream_keys(prefix)
    good = {"user_id": "u1", "item_id": "5", "timestamp": "1700000000"}
    poison = [
        ({"item_id": "5"}, "user_id"),
        ({"user_id": "a/b", "item_id": "5"}, "user_id"),
        ({"user_id": "u1", "item_id": "five"}, "item_id"),
        ({"user_id": "u1", "item_id": "999"}, "unknown item 999"),
        ({"user_id": "u1", "item_id": "5", "timestamp": "nan"}, "timestamp outside"),
        ({"user_id": "u1", "item_id": "5", "timestamp": str(time.time() + 3 * 86400)}, "ahead"),
        ({"user_id": "u1", "item_id": "6", "event_id": "used"}, "already used"),
        ({"user_id": "u2", "item_id": "7", "event_id": "twice"}, None),
        ({"user_id": "u2", "item_id": "8", "event_id": "twice"}, "repeated for another"),
    ]

    async def run() -> Consumer:
        client = aioredis.Redis.from_url(REDIS)
        store = RedisProfileStore.from_url(REDIS, prefix=prefix)
        await store.add([Interaction("u1", 5, None, "used")])  # "used" names another event
        consumer = Consumer(client, store, prefix, "one", lambda: KNOWN, block_ms=10)
        await consumer.setup()
        for fields, _ in poison:
            await client.xadd(stream, fields)  # type: ignore[arg-type]
        await client.xadd(stream, good)  # type: ignore[arg-type]
        while await consumer.step():
            pass
        assert (await client.xpending(stream, GROUP))["pending"] == 0  # every entry acknowledged
        await store.close()
        await client.aclose()
        return consumer

    consumer = asyncio.run(run())
    with redis.Redis.from_url(REDIS, decode_responses=True) as r:
        buried = [fields for _, fields in r.xrange(letters)]
    buried.sort(key=lambda f: tuple(map(int, f["source_id"].split("-"))))  # in stream order
    reasons = [why for _, why in poison if why is not None]
    assert consumer.dead == len(reasons) == len(buried)
    for fields, why in zip(buried, reasons, strict=True):
        assert why in fields["reason"] and fields["source_id"]
    assert consumer.applied == 2  # the good one and the first "twice"
    profiles = stored(REDIS, prefix, ["u1", "u2"])
    assert {u: p.recent for u, p in profiles.items()} == {"u1": [5], "u2": [7]}


def test_consumer_processes_killed_mid_stream_lose_and_repeat_nothing(
    prefix: str, world_features: tuple[Path, np.ndarray]
) -> None:
    """Two visrec-ingest processes; one SIGKILLed while events flow, then a third started."""
    features = world_features[0]
    _, meta = load_features(features)
    events = _events(4000, seed=1, known=frozenset(meta.item_ids))
    stream, _ = stream_keys(prefix)

    def consumer(name: str) -> subprocess.Popen[bytes]:
        return start_consumer(name, features, REDIS, prefix, "--batch", "200")

    procs = [consumer("a"), consumer("b")]
    try:
        with redis.Redis.from_url(REDIS) as r:
            for start in range(0, len(events), 500):
                with r.pipeline(transaction=False) as pipe:
                    for e in events[start : start + 500]:
                        pipe.xadd(stream, e)  # type: ignore[arg-type]
                    pipe.execute()
                if start == 1500:
                    procs[0].send_signal(signal.SIGKILL)
                    procs.append(consumer("c"))
                time.sleep(0.1)
            deadline = time.monotonic() + 60
            while not _drained(r, stream, len(events)):
                assert time.monotonic() < deadline, "the stream was not drained"
                time.sleep(0.2)
        users = sorted({e["user_id"] for e in events})
        assert stored(REDIS, prefix, users) == replayed(events)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)


def _drained(r: redis.Redis, stream: str, total: int) -> bool:
    found = group(r, stream)
    return found is not None and found["entries-read"] == total and found["pending"] == 0
