"""``visrec-ingest`` processes and the events stream they read, for tests and benchmarks alike:
starting a consumer, reading the group's state, appending events at a rate, and the profiles
a replay of the events gives."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import redis

from service.ingest import GROUP
from service.store.memory import MemoryProfileStore
from service.store.profiles import Interaction, Profile
from service.store.redis.profiles import RedisProfileStore

INGEST = str(Path(sys.executable).parent / "visrec-ingest")  # the installed entry point


def start_consumer(
    name: str, features: Path, redis_url: str, prefix: str, *extra: str
) -> subprocess.Popen[bytes]:
    """One ``visrec-ingest`` process reading ``<prefix>:events`` (its log kept out of the way)."""
    env = {**os.environ, "VISREC_REDIS_URL": redis_url, "VISREC_REDIS_PREFIX": prefix}
    command = [INGEST, "--name", name, "--features", str(features), *extra]
    return subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)


def group(r: redis.Redis, stream: str) -> dict | None:
    """The consumers' group (``XINFO GROUPS``), once the first consumer made it."""
    if not r.exists(stream):
        return None
    return next((g for g in r.xinfo_groups(stream) if g["name"] == GROUP.encode()), None)


def pending_of(r: redis.Redis, stream: str, consumer: str) -> int:
    """Entries ``consumer`` has read and not acknowledged."""
    for c in r.xinfo_consumers(stream, GROUP):
        if c["name"] == consumer.encode():
            return int(c["pending"])
    return 0


class Producer:
    """Appends events of random users (``bg<n>``) and items at ``rate`` a second, paced from
    when the rate was set, until ``stop`` is set or the seconds given to :meth:`run` passed."""

    def __init__(self, r: redis.Redis, stream: str, items: Sequence[int], rate: float = 0.0):
        self.redis, self.stream, self.items = r, stream, items
        self.stop = threading.Event()
        self.sent = 0
        self.set_rate(rate)

    def set_rate(self, rate: float) -> None:
        self._rate, self._since, self._sent_before = rate, time.perf_counter(), self.sent

    def run(self, seconds: float | None = None) -> None:
        rng = np.random.default_rng(2)
        started = time.perf_counter()
        while not self.stop.is_set() and (
            seconds is None or time.perf_counter() - started < seconds
        ):
            due = int(self._rate * (time.perf_counter() - self._since)) - (
                self.sent - self._sent_before
            )
            if due <= 0:
                time.sleep(0.002)
                continue
            with self.redis.pipeline(transaction=False) as pipe:
                for _ in range(due):
                    user, item = (
                        rng.integers(10_000),
                        self.items[int(rng.integers(len(self.items)))],
                    )
                    pipe.xadd(self.stream, {"user_id": f"bg{user}", "item_id": str(item)})
                pipe.execute()
            self.sent += due


def replayed(events: Sequence[dict[str, str]]) -> dict[str, Profile]:
    """Users' profiles after ``events`` (stream fields, with timestamps), in order, through the
    in-process store."""

    async def run() -> dict[str, Profile]:
        memory = MemoryProfileStore()
        for start in range(0, len(events), 100_000):
            chunk = events[start : start + 100_000]
            await memory.add(
                [Interaction(e["user_id"], int(e["item_id"]), float(e["timestamp"])) for e in chunk]
            )
        users = sorted({e["user_id"] for e in events})
        return dict(zip(users, await memory.profiles(users), strict=True))

    return asyncio.run(run())


def stored(redis_url: str, prefix: str, users: Sequence[str]) -> dict[str, Profile]:
    """The users' profiles in Redis."""

    async def run() -> dict[str, Profile]:
        store = RedisProfileStore.from_url(redis_url, prefix=prefix)
        try:
            return dict(zip(users, await store.profiles(list(users)), strict=True))
        finally:
            await store.close()

    return asyncio.run(run())
