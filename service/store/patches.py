"""What ``PATCH /items/{id}`` set, kept where every process reads it: the items switched off
(never recommended by any process until switched on again) and the attributes changed.

Each is a table of string fields with a version that every change raises, so a process polls
one number (cheap) and reads the whole table only when it changed. Three stores share one
contract, :class:`ItemTable`, as the item stores do: in process, a file (one process; survives
restarts) and Redis (every replica and worker; as durable as the profiles).

Redis layout, for prefix ``visrec``: one hash a table, a field per entry and the field
``version``: ``visrec:items:off`` (field: an item id switched off, value ``1``) and
``visrec:items:changes`` (field ``<item id>:<attribute>``, value the attribute's values as
JSON). A change is one transaction on one key (so one slot of a Redis Cluster).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis

from service.store.redis.client import reaching, redis_client
from service.store.redis.deadline import LoopLag

VERSION = "version"
Fields = Mapping[str, str | None]  # a value to set, or None to delete


class ItemTable(Protocol):
    async def put(self, fields: Fields) -> None:
        """Set (or delete, for None) every field of ``fields`` at once, raising the version."""
        ...

    async def version(self) -> int: ...

    async def read(self) -> tuple[int, dict[str, str]]:
        """The version and the fields at it."""
        ...

    async def close(self) -> None: ...


class MemoryTable:
    def __init__(self) -> None:
        self._version, self._fields = 0, dict[str, str]()

    async def put(self, fields: Fields) -> None:
        changed = dict(self._fields)
        for name, value in fields.items():
            if value is None:
                changed.pop(name, None)
            else:
                changed[name] = value
        self._fields = changed
        self._version += 1

    async def version(self) -> int:
        return self._version

    async def read(self) -> tuple[int, dict[str, str]]:
        return self._version, dict(self._fields)

    async def close(self) -> None:
        pass


class FileTable(MemoryTable):
    """Kept in ``path`` (JSON, replaced whole), for a process that keeps added items in a
    folder. Reads the file of switches written before tables were general
    (``{"version": v, "off": [ids]}``) as the table of items switched off."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path
        self._writing = asyncio.Lock()  # one change at a time: the file holds the newest table
        if path.is_file():
            saved = json.loads(path.read_text())
            fields = saved.get("fields") or {str(i): "1" for i in saved.get("off", ())}
            self._version, self._fields = saved["version"], fields

    async def put(self, fields: Fields) -> None:
        async with self._writing:
            await super().put(fields)
            state = json.dumps({"version": self._version, "fields": self._fields})
            await asyncio.to_thread(self._write, state)

    def _write(self, state: str) -> None:
        """Whole or not at all, and on disk before the change is answered (as the folder of
        added items writes its files)."""
        partial = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        with open(partial, "w") as f:
            f.write(state)
            f.flush()
            os.fsync(f.fileno())
        partial.replace(self._path)


class RedisTable:
    def __init__(
        self, client: aioredis.Redis | aioredis.RedisCluster, *, key: str, deadline_s: float
    ) -> None:
        self._client = client
        self._key = key
        self._deadline_s = deadline_s
        self._lag = LoopLag()

    @classmethod
    def from_url(cls, url: str, *, key: str, deadline_s: float) -> RedisTable:
        return cls(redis_client(url), key=key, deadline_s=deadline_s)

    async def put(self, fields: Fields) -> None:
        gone = [f for f, v in fields.items() if v is None]
        async with reaching(self._deadline_s, self._lag), self._client.pipeline() as pipe:
            if gone:
                pipe.hdel(self._key, *gone)
            if len(gone) < len(fields):
                pipe.hset(self._key, mapping={f: v for f, v in fields.items() if v is not None})
            pipe.hincrby(self._key, VERSION, 1)
            await pipe.execute()

    async def version(self) -> int:
        async with reaching(self._deadline_s, self._lag):
            return int(await self._client.hget(self._key, VERSION) or 0)

    async def read(self) -> tuple[int, dict[str, str]]:
        async with reaching(self._deadline_s, self._lag):
            stored = await self._client.hgetall(self._key)
        fields = {_text(f): _text(v) for f, v in stored.items()}
        return int(fields.pop(VERSION, 0)), fields

    async def close(self) -> None:
        await self._lag.stop()
        await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
