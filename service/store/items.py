"""Items added while serving (``POST /items``): their image and raw component features, kept
where every replica and every restart finds them.

Three stores share one contract, :class:`ItemStore`: in process (gone with it), a directory
(one process; survives restarts), and Redis (shared by replicas; as durable as the profiles).
What is stored is what the image was, not what one model made of it: the raw (K, C) features
of the serving backbone, so a reloaded model builds its own tables for the added items.

Redis layout, for prefix ``visrec``: one hash ``visrec:items`` from item id to the item
encoded as below. ``HSETNX`` adds an item only when its id is free, atomically, so two
replicas adding the same id at once cannot both succeed. Beside it, what a start reads instead
of the raw features (125 KB an item at EfficientNet-Lite0's shape; 10,000 items took a start
2.5 s more to read and project): ``visrec:items:about``, each item without its features, and
``visrec:items:rows:<projection key>``, its rows through one model's projection (25 KB),
written by the first process that projected them and kept ``ROWS_TTL_S`` after the last start
or pick-up that read them (a cache: gone, it costs a start the time to project again).

Adding is idempotent: an item whose id is stored with the same image, title, genres and
attributes counts as added (a client retrying after an answer that was lost or late, when the
first call had stored it).

Encoding: a 4-byte little-endian length, a JSON header (title, genres, attributes, media type,
feature shape and dtype, image length), the feature bytes, then the image bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis

from service.store.redis.client import reaching, redis_client
from service.store.redis.deadline import LoopLag

# Bytes per HMGET (one item at least): an item is >= 125 KB of features, and reading every
# added item in one call under the deadline (250 ms) failed from ~600 items on, so no process
# could start; images are up to max_image_bytes, so a number of items is no bound
READ_BYTES = 4 << 20
LENGTHS_PER_CALL = 1000  # fields whose stored length one call asks
# read-only: it runs on replicas, and when Redis is over maxmemory
_LENGTHS_LUA = (
    "#!lua flags=no-writes\n"
    + (resources.files("service.store.redis") / "lua" / "lengths.lua").read_text()
)
ROWS_TTL_S = 7 * 24 * 3600
NO_FEATURES = np.empty(0, np.float16)


@dataclass(frozen=True)
class AddedItem:
    item_id: int
    title: str
    media_type: str  # of ``image``, e.g. image/png
    image: bytes
    features: np.ndarray  # (K, C) float16 raw component features of the image
    genres: tuple[str, ...] = ()  # sorted; what a model with metadata reads beside the image
    # other attributes, for filters: (name, sorted values), by name
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def same_as(self, other: AddedItem) -> bool:
        """Whether ``other`` is this item sent again: the same id, image, title, genres and
        attributes (features are what a backbone made of the image, which may differ in the
        last bits by machine)."""
        return self._sent() == other._sent()

    def _sent(self) -> tuple[object, ...]:
        return (
            self.item_id,
            self.title,
            self.media_type,
            self.image,
            self.genres,
            self.attributes,
        )


class ItemStore(Protocol):
    async def add(self, item: AddedItem) -> bool:
        """Store ``item``; True also when it is stored already (:meth:`AddedItem.same_as`),
        False, changing nothing, when its id holds another item."""
        ...

    async def ids(self) -> list[int]: ...

    async def get(self, ids: list[int]) -> list[AddedItem]: ...

    async def about(self, ids: list[int]) -> list[AddedItem]:
        """The stored items of ``ids``, their features possibly left out (empty)."""
        ...

    async def rows(self, key: str, ids: list[int]) -> dict[int, np.ndarray]:
        """The rows through projection ``key`` kept for those of ``ids`` that have them."""
        ...

    async def keep_rows(self, key: str, rows: dict[int, np.ndarray]) -> None: ...

    async def close(self) -> None: ...


class Uncached(ABC):
    """For a store whose start reads the items whole: no rows are kept."""

    @abstractmethod
    async def get(self, ids: list[int]) -> list[AddedItem]: ...

    async def about(self, ids: list[int]) -> list[AddedItem]:
        return await self.get(ids)

    async def rows(self, key: str, ids: list[int]) -> dict[int, np.ndarray]:
        return {}

    async def keep_rows(self, key: str, rows: dict[int, np.ndarray]) -> None:  # noqa: B027
        """Nothing is kept."""


def _without_features(item: AddedItem) -> AddedItem:
    return replace(item, features=NO_FEATURES)


def encode_item(item: AddedItem) -> bytes:
    features = np.ascontiguousarray(item.features, dtype=np.float16)
    header = json.dumps(
        {
            "item_id": item.item_id,
            "title": item.title,
            "genres": list(item.genres),
            "attributes": {name: list(values) for name, values in item.attributes},
            "media_type": item.media_type,
            "shape": list(features.shape),
            "image_bytes": len(item.image),
        }
    ).encode()
    return len(header).to_bytes(4, "little") + header + features.tobytes() + item.image


def decode_item(blob: bytes) -> AddedItem:
    size = int.from_bytes(blob[:4], "little")
    header = json.loads(blob[4 : 4 + size])
    start = 4 + size
    count = int(np.prod(header["shape"]))
    features = np.frombuffer(blob, dtype=np.float16, count=count, offset=start)
    image = blob[start + 2 * count :]
    if len(image) != header["image_bytes"]:
        raise ValueError(f"stored item {header['item_id']} is truncated")
    return AddedItem(
        header["item_id"],
        header["title"],
        header["media_type"],
        image,
        features.reshape(header["shape"]),
        tuple(header.get("genres", ())),  # items stored before genres were taken have none
        tuple((n, tuple(v)) for n, v in header.get("attributes", {}).items()),  # and these
    )


def encode_rows(rows: np.ndarray) -> bytes:
    """(K, R) projected rows: the two sizes as little-endian uint32, then float32 values."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return np.asarray(rows.shape, dtype="<u4").tobytes() + rows.tobytes()


def decode_rows(blob: bytes) -> np.ndarray:
    shape = np.frombuffer(blob, dtype="<u4", count=2)
    return np.frombuffer(blob, dtype=np.float32, offset=8).reshape(shape)  # read-only


def _pieces(ids: list[int], size: int) -> list[list[str]]:
    return [[str(i) for i in ids[start : start + size]] for start in range(0, len(ids), size)]


class MemoryItemStore(Uncached):
    """In this process only: added items are gone when it stops."""

    def __init__(self) -> None:
        self._items: dict[int, AddedItem] = {}

    async def add(self, item: AddedItem) -> bool:
        stored = self._items.setdefault(item.item_id, item)
        return stored.same_as(item)

    async def ids(self) -> list[int]:
        return list(self._items)

    async def get(self, ids: list[int]) -> list[AddedItem]:
        return [self._items[i] for i in ids if i in self._items]

    async def close(self) -> None:
        pass


class DirectoryItemStore(Uncached):
    """One file per item, ``<id>.item`` (encoded as above), in ``folder``. A file is written
    under a temporary name and linked to its final name only if that name is free, so an
    item is either whole or absent, and an id is taken once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    async def add(self, item: AddedItem) -> bool:
        return await asyncio.to_thread(self._add, item)

    def _add(self, item: AddedItem) -> bool:
        final = self.folder / f"{item.item_id}.item"
        tmp = self.folder / f".{item.item_id}.{os.getpid()}.tmp"
        tmp.write_bytes(encode_item(item))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)  # fails if the id is taken
        except FileExistsError:
            return decode_item(final.read_bytes()).same_as(item)
        finally:
            tmp.unlink()
        return True

    async def ids(self) -> list[int]:
        return sorted(int(p.stem) for p in self.folder.glob("*.item"))

    async def get(self, ids: list[int]) -> list[AddedItem]:
        paths = [self.folder / f"{i}.item" for i in ids]
        return [decode_item(await asyncio.to_thread(p.read_bytes)) for p in paths if p.is_file()]

    async def close(self) -> None:
        pass


class RedisItemStore:
    """Shared by every replica; Redis's own persistence (AOF) keeps it across restarts. Calls
    are bounded and their outages classified as the profile store's are
    (:func:`~service.store.profiles.reaching`)."""

    def __init__(
        self, client: aioredis.Redis | aioredis.RedisCluster, *, prefix: str, deadline_s: float
    ) -> None:
        self._client = client
        self._key = f"{prefix}:items"
        self._about = f"{prefix}:items:about"
        self._rows = f"{prefix}:items:rows"
        self._lengths = client.register_script(_LENGTHS_LUA)
        self._deadline_s = deadline_s
        self._lag = LoopLag()

    @classmethod
    def from_url(cls, url: str, *, prefix: str, deadline_s: float) -> RedisItemStore:
        return cls(redis_client(url), prefix=prefix, deadline_s=deadline_s)

    async def add(self, item: AddedItem) -> bool:
        field = str(item.item_id)
        async with reaching(self._deadline_s, self._lag):
            if not await self._client.hsetnx(self._key, field, encode_item(item)):
                stored = await self._client.hget(self._key, field)
                if not (isinstance(stored, bytes) and decode_item(stored).same_as(item)):
                    return False
            # after the item: an item without it is read whole (about)
            await self._client.hset(self._about, field, encode_item(_without_features(item)))
        return True

    async def ids(self) -> list[int]:
        async with reaching(self._deadline_s, self._lag):
            keys = await self._client.hkeys(self._key)
        return sorted(int(k) for k in keys)

    async def get(self, ids: list[int]) -> list[AddedItem]:
        """The stored items of ``ids``, read in pieces of ``READ_BYTES``, each call under the
        deadline (so their number is not bounded by it)."""
        return [decode_item(blob) for _, blob in await self._read(self._key, ids)]

    async def about(self, ids: list[int]) -> list[AddedItem]:
        """Without their features; items stored before these were kept (or whose ``about``
        a crash left unwritten) are read whole, and their ``about`` written for next time."""
        read = await self._read(self._about, ids)
        found = {i.item_id: i for i in (decode_item(blob) for _, blob in read)}
        whole = await self.get([i for i in ids if i not in found])
        if whole:
            async with reaching(self._deadline_s, self._lag):
                await self._client.hset(
                    self._about,
                    mapping={str(i.item_id): encode_item(_without_features(i)) for i in whole},
                )
        found |= {i.item_id: i for i in whole}
        return [found[i] for i in ids if i in found]

    async def rows(self, key: str, ids: list[int]) -> dict[int, np.ndarray]:
        name = f"{self._rows}:{key}"
        found = {int(field): decode_rows(blob) for field, blob in await self._read(name, ids)}
        if found:
            async with reaching(self._deadline_s, self._lag):
                await self._client.expire(name, ROWS_TTL_S)
        return found

    async def keep_rows(self, key: str, rows: dict[int, np.ndarray]) -> None:
        if not rows:
            return
        name = f"{self._rows}:{key}"
        per_call = max(1, READ_BYTES // max(r.nbytes + 8 for r in rows.values()))
        for fields in _pieces(list(rows), per_call):
            async with reaching(self._deadline_s, self._lag):
                await self._client.hset(
                    name, mapping={f: encode_rows(rows[int(f)]) for f in fields}
                )
        async with reaching(self._deadline_s, self._lag):
            await self._client.expire(name, ROWS_TTL_S)

    async def _read(self, name: str, ids: list[int]) -> list[tuple[str, bytes]]:
        """(field, value) of those of ``ids`` that ``name`` holds, read by HMGET in pieces of
        at most ``READ_BYTES`` (or one field), each call under the deadline."""
        out: list[tuple[str, bytes]] = []
        for fields in await self._pieces_of(name, ids):
            async with reaching(self._deadline_s, self._lag):
                values = await self._client.hmget(name, fields)
            out += [(f, v) for f, v in zip(fields, values, strict=True) if isinstance(v, bytes)]
        return out

    async def _pieces_of(self, name: str, ids: list[int]) -> list[list[str]]:
        """The fields of ``ids`` that ``name`` holds, in pieces of at most ``READ_BYTES``
        stored bytes (a longer value is a piece of its own)."""
        pieces: list[list[str]] = [[]]
        size = 0
        for fields in _pieces(ids, LENGTHS_PER_CALL):
            async with reaching(self._deadline_s, self._lag):
                lengths = await self._lengths(keys=[name], args=fields)
            for f, length in zip(fields, lengths, strict=True):
                if not length:  # not stored
                    continue
                if pieces[-1] and size + length > READ_BYTES:
                    pieces.append([])
                    size = 0
                pieces[-1].append(f)
                size += length
        return [p for p in pieces if p]

    async def close(self) -> None:
        await self._lag.stop()
        await self._client.aclose()
