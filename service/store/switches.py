"""Which items are switched off (``PATCH /items/{id}`` with ``available: false``): never
recommended by any process until switched on again.

Three stores share one contract, :class:`Switches`, as the item stores do: in process, a file
(one process; survives restarts) and Redis (every replica and worker; as durable as the
profiles). Each carries a version that every change raises, so a process polls one number
(cheap) and reads the whole set only when it changed.

Redis layout, for prefix ``visrec``: one hash ``visrec:items:off``, a field per item switched
off and the field ``version``; a change is one transaction on that one key (so one slot of a
Redis Cluster).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis

from service.store.redis.client import reaching, redis_client
from service.store.redis.deadline import LoopLag

VERSION = "version"


class Switches(Protocol):
    async def switch(self, item_id: int, *, available: bool) -> None: ...

    async def version(self) -> int: ...

    async def off(self) -> tuple[int, frozenset[int]]:
        """The version and the items switched off at it."""
        ...

    async def close(self) -> None: ...


class MemorySwitches:
    def __init__(self) -> None:
        self._version, self._off = 0, frozenset[int]()

    async def switch(self, item_id: int, *, available: bool) -> None:
        self._off = self._off - {item_id} if available else self._off | {item_id}
        self._version += 1

    async def version(self) -> int:
        return self._version

    async def off(self) -> tuple[int, frozenset[int]]:
        return self._version, self._off

    async def close(self) -> None:
        pass


class FileSwitches(MemorySwitches):
    """Kept in ``path`` (JSON, replaced whole), for a process that keeps added items in a
    folder."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path
        self._writing = asyncio.Lock()  # one switch at a time: the file holds the newest set
        if path.is_file():
            saved = json.loads(path.read_text())
            self._version, self._off = saved["version"], frozenset(saved["off"])

    async def switch(self, item_id: int, *, available: bool) -> None:
        async with self._writing:
            await super().switch(item_id, available=available)
            state = json.dumps({"version": self._version, "off": sorted(self._off)})
            await asyncio.to_thread(self._write, state)

    def _write(self, state: str) -> None:
        """Whole or not at all, and on disk before the switch is answered (as the folder of
        added items writes its files)."""
        partial = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        with open(partial, "w") as f:
            f.write(state)
            f.flush()
            os.fsync(f.fileno())
        partial.replace(self._path)


class RedisSwitches:
    def __init__(
        self, client: aioredis.Redis | aioredis.RedisCluster, *, prefix: str, deadline_s: float
    ) -> None:
        self._client = client
        self._key = f"{prefix}:items:off"
        self._deadline_s = deadline_s
        self._lag = LoopLag()

    @classmethod
    def from_url(cls, url: str, *, prefix: str, deadline_s: float) -> RedisSwitches:
        return cls(redis_client(url), prefix=prefix, deadline_s=deadline_s)

    async def switch(self, item_id: int, *, available: bool) -> None:
        async with reaching(self._deadline_s, self._lag), self._client.pipeline() as pipe:
            if available:
                pipe.hdel(self._key, str(item_id))
            else:
                pipe.hset(self._key, str(item_id), 1)
            pipe.hincrby(self._key, VERSION, 1)
            await pipe.execute()

    async def version(self) -> int:
        async with reaching(self._deadline_s, self._lag):
            return int(await self._client.hget(self._key, VERSION) or 0)

    async def off(self) -> tuple[int, frozenset[int]]:
        async with reaching(self._deadline_s, self._lag):
            fields = await self._client.hgetall(self._key)
        version = int(fields.pop(VERSION.encode(), 0))
        return version, frozenset(int(f) for f in fields)

    async def close(self) -> None:
        await self._lag.stop()
        await self._client.aclose()
