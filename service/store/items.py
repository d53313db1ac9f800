"""Items added while serving (``POST /items``): their image and raw component features, kept
where every replica and every restart finds them.

Three stores share one contract, :class:`ItemStore`: in process (gone with it), a directory
(one process; survives restarts), and Redis (shared by replicas; as durable as the profiles).
What is stored is what the image was, not what one model made of it: the raw (K, C) features
of the serving backbone, so a reloaded model builds its own tables for the added items.

Redis layout, for prefix ``visrec``: one hash ``visrec:items`` from item id to the item
encoded as below. ``HSETNX`` adds an item only when its id is free, atomically, so two
replicas adding the same id at once cannot both succeed.

Adding is idempotent: an item whose id is stored with the same image, title and genres counts as
added (a client retrying after an answer that was lost or late, when the first call had stored
it).

Encoding: a 4-byte little-endian length, a JSON header (title, genres, media type, feature
shape and dtype, image length), the feature bytes, then the image bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis

from service.store.redis.client import reaching, redis_client
from service.store.redis.deadline import LoopLag

# Items per HMGET: an item is >= 125 KB of features, and reading every added item in one call
# under the read deadline (250 ms) failed from ~600 items on, so no process could start
ITEMS_PER_CALL = 16


@dataclass(frozen=True)
class AddedItem:
    item_id: int
    title: str
    media_type: str  # of ``image``, e.g. image/png
    image: bytes
    features: np.ndarray  # (K, C) float16 raw component features of the image
    genres: tuple[str, ...] = ()  # sorted; what a model with metadata reads beside the image

    def same_as(self, other: AddedItem) -> bool:
        """Whether ``other`` is this item sent again: the same id, image, title and genres
        (features are what a backbone made of the image, which may differ in the last bits by
        machine)."""
        return (self.item_id, self.title, self.media_type, self.image, self.genres) == (
            other.item_id,
            other.title,
            other.media_type,
            other.image,
            other.genres,
        )


class ItemStore(Protocol):
    async def add(self, item: AddedItem) -> bool:
        """Store ``item``; True also when it is stored already (:meth:`AddedItem.same_as`),
        False, changing nothing, when its id holds another item."""
        ...

    async def ids(self) -> list[int]: ...

    async def get(self, ids: list[int]) -> list[AddedItem]: ...

    async def close(self) -> None: ...


def encode_item(item: AddedItem) -> bytes:
    features = np.ascontiguousarray(item.features, dtype=np.float16)
    header = json.dumps(
        {
            "item_id": item.item_id,
            "title": item.title,
            "genres": list(item.genres),
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
    )


class MemoryItemStore:
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


class DirectoryItemStore:
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
        self._deadline_s = deadline_s
        self._lag = LoopLag()

    @classmethod
    def from_url(cls, url: str, *, prefix: str, deadline_s: float) -> RedisItemStore:
        return cls(redis_client(url), prefix=prefix, deadline_s=deadline_s)

    async def add(self, item: AddedItem) -> bool:
        field = str(item.item_id)
        async with reaching(self._deadline_s, self._lag):
            if await self._client.hsetnx(self._key, field, encode_item(item)):
                return True
            stored = await self._client.hget(self._key, field)
        return isinstance(stored, bytes) and decode_item(stored).same_as(item)

    async def ids(self) -> list[int]:
        async with reaching(self._deadline_s, self._lag):
            keys = await self._client.hkeys(self._key)
        return sorted(int(k) for k in keys)

    async def get(self, ids: list[int]) -> list[AddedItem]:
        """The stored items of ``ids``, read ``ITEMS_PER_CALL`` at a time, each call under
        the deadline (so their number is not bounded by it)."""
        out: list[AddedItem] = []
        for start in range(0, len(ids), ITEMS_PER_CALL):
            fields = [str(i) for i in ids[start : start + ITEMS_PER_CALL]]
            async with reaching(self._deadline_s, self._lag):
                blobs = await self._client.hmget(self._key, fields)
            out += [decode_item(b) for b in blobs if isinstance(b, bytes)]
        return out

    async def close(self) -> None:
        await self._lag.stop()
        await self._client.aclose()
