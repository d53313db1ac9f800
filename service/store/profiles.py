"""User profiles for serving: each user's recent items (the model's input) and every item they
have seen (excluded from recommendations).

Two stores share one contract, :class:`ProfileStore`: :class:`MemoryProfileStore` in-process,
and :class:`RedisProfileStore`, where several API workers share profiles. Item ids are the
dataset's raw ids, not model indices.

Redis key layout, for prefix ``visrec`` and user ``alice``::

    visrec:{u:alice}:recent   list of the last ``max_recent`` item ids, oldest first
    visrec:{u:alice}:seen     set of every item id
    visrec:{u:alice}:ev       sorted set: applied event id -> time applied (seconds); with a TTL

The ``{u:...}`` hash tag puts all of a user's keys in one Redis Cluster slot, so the Lua script
that updates them runs on one node. The user id inside it is percent-encoded, so ids holding
``{``, ``}``, ``:`` or ``%`` can neither break the tag nor collide with another user's keys.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

MAX_RECENT = 9
EVENT_TTL_S = 7 * 24 * 3600
# Users per pipeline round trip in bulk calls: bounds the client's buffers, not correctness.
BATCH_USERS = 1000

T = TypeVar("T")
Clock = Callable[[], float]


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: int  # raw item id (as in the dataset), not a model index
    timestamp: float | None = None  # when it happened (seconds); kept for callers, not ordering
    event_id: str | None = None  # retries with the same id are applied once; "" means none


class ProfileStore(Protocol):
    max_recent: int

    async def recent(self, user_ids: Sequence[str]) -> list[list[int]]:
        """Per user, their last <= ``max_recent`` distinct item ids, oldest first."""
        ...

    async def seen(self, user_ids: Sequence[str]) -> list[set[int]]:
        """Per user, every item id they interacted with."""
        ...

    async def add(self, events: Sequence[Interaction]) -> int:
        """Apply ``events`` in order, skipping already-applied event ids; returns how many were
        applied. Each user's update is atomic."""
        ...

    async def load(self, histories: Mapping[str, Sequence[int]]) -> None:
        """Replace each given user's profile by their history (raw item ids, oldest first)."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def recent_of(history: Iterable[int], max_recent: int) -> list[int]:
    """The last ``max_recent`` distinct items of ``history``, oldest first, each at its latest
    occurrence: exactly what replaying ``history`` through ``add`` leaves in ``recent``."""
    picked: dict[int, None] = {}  # a dict keeps insertion order, newest first here
    for item in reversed(list(history)):
        if len(picked) == max_recent:
            break
        picked.setdefault(int(item), None)
    return list(reversed(picked))


def _check_limits(max_recent: int, event_ttl_s: int) -> None:
    if max_recent < 1:
        raise ValueError(f"max_recent must be at least 1, got {max_recent}")
    if event_ttl_s < 1:
        raise ValueError(f"event_ttl_s must be at least 1 second, got {event_ttl_s}")


def _by_user(events: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Events grouped by user, each group in the given order."""
    groups: dict[str, list[Interaction]] = {}
    for event in events:
        groups.setdefault(event.user_id, []).append(event)
    return groups


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


# --------------------------------------------------------------------------- in-process store


@dataclass
class _Profile:
    recent: list[int] = field(default_factory=list)  # oldest first
    seen: set[int] = field(default_factory=set)
    events: dict[str, float] = field(default_factory=dict)  # event id -> time applied


class MemoryProfileStore:
    """Profiles in a dict: the default when no Redis is configured (one process, lost on exit)."""

    def __init__(
        self,
        max_recent: int = MAX_RECENT,
        *,
        event_ttl_s: int = EVENT_TTL_S,
        clock: Clock = time.time,
    ) -> None:
        _check_limits(max_recent, event_ttl_s)
        self.max_recent = max_recent
        self.event_ttl_s = event_ttl_s
        self._clock = clock
        self._profiles: dict[str, _Profile] = {}
        # Updates have no await inside today, but the lock keeps them atomic if one ever does.
        self._lock = asyncio.Lock()

    async def recent(self, user_ids: Sequence[str]) -> list[list[int]]:
        async with self._lock:
            return [list(self._get(u).recent) for u in user_ids]

    async def seen(self, user_ids: Sequence[str]) -> list[set[int]]:
        async with self._lock:
            return [set(self._get(u).seen) for u in user_ids]

    async def add(self, events: Sequence[Interaction]) -> int:
        async with self._lock:
            now = self._clock()
            return sum(self._apply(user, group, now) for user, group in _by_user(events).items())

    async def load(self, histories: Mapping[str, Sequence[int]]) -> None:
        async with self._lock:
            for user, history in histories.items():
                recent = recent_of(history, self.max_recent)
                self._profiles[user] = _Profile(recent, {int(i) for i in history})

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    def _get(self, user_id: str) -> _Profile:
        # Readers must not create profiles for unknown users (that would grow without bound).
        profile = self._profiles.get(user_id)
        return profile if profile is not None else _Profile()

    def _apply(self, user_id: str, events: list[Interaction], now: float) -> int:
        profile = self._profiles.setdefault(user_id, _Profile())
        # Same rule as the Redis script: ids older than the TTL are forgotten before checking.
        cutoff = now - self.event_ttl_s
        profile.events = {e: t for e, t in profile.events.items() if t > cutoff}
        applied = 0
        for event in events:
            if event.event_id and event.event_id in profile.events:
                continue
            item = int(event.item_id)
            if item in profile.recent:
                profile.recent.remove(item)
            profile.recent.append(item)
            del profile.recent[: -self.max_recent]
            profile.seen.add(item)
            if event.event_id:
                profile.events[event.event_id] = now
            applied += 1
        return applied


# --------------------------------------------------------------------------- Redis store

# One user's events, atomically: Redis runs a script to completion before any other command,
# so no reader sees half an update and concurrent adds for one user cannot interleave.
# KEYS: recent, seen, events. ARGV: max_recent, event_ttl_s, now, then (item, event_id) pairs,
# event_id "" meaning none.
_ADD_LUA = """
local recent, seen, events = KEYS[1], KEYS[2], KEYS[3]
local max_recent, ttl, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', events, '-inf', now - ttl)
local applied, logged = 0, false
for i = 4, #ARGV, 2 do
  local item, event_id = ARGV[i], ARGV[i + 1]
  if event_id == '' or not redis.call('ZSCORE', events, event_id) then
    redis.call('LREM', recent, 0, item)
    redis.call('RPUSH', recent, item)
    redis.call('SADD', seen, item)
    if event_id ~= '' then
      redis.call('ZADD', events, now, event_id)
      logged = true
    end
    applied = applied + 1
  end
end
-- Trimming once at the end keeps the same items as trimming after every push.
if applied > 0 then redis.call('LTRIM', recent, -max_recent, -1) end
if logged then redis.call('EXPIRE', events, ttl) end
return applied
"""

# Replace one user's profile atomically. KEYS: recent, seen, events.
# ARGV: n_recent, the n_recent recent items (oldest first), then the distinct seen items.
_LOAD_LUA = """
-- unpack() is bounded by Lua's C stack (about 8000 values), hence the chunks.
local function push(command, key, first, last)
  for i = first, last, 1000 do
    redis.call(command, key, unpack(ARGV, i, math.min(i + 999, last)))
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
local n = tonumber(ARGV[1])
push('RPUSH', KEYS[1], 2, n + 1)
push('SADD', KEYS[2], n + 2, #ARGV)
return 0
"""


@dataclass(frozen=True)
class UserKeys:
    recent: str
    seen: str
    events: str

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.recent, self.seen, self.events)


def user_keys(prefix: str, user_id: str) -> UserKeys:
    """The user's keys; see the module docstring. ``quote`` leaves only ``A-Za-z0-9_.-~``
    unescaped and escapes ``%`` itself, so the encoding is one-to-one and never holds ``}``."""
    base = f"{prefix}:{{u:{quote(user_id, safe='')}}}"
    return UserKeys(recent=f"{base}:recent", seen=f"{base}:seen", events=f"{base}:ev")


def _event_args(events: Iterable[Interaction]) -> list[str | int]:
    """The add script's (item, event_id) pairs; int() turns numpy ids into ones Redis takes."""
    return [arg for e in events for arg in (int(e.item_id), e.event_id or "")]


def redis_client(url: str, *, timeout_s: float = 2.0, max_connections: int = 50) -> aioredis.Redis:
    """A client whose pool makes callers wait (up to ``timeout_s``) for a free connection: the
    default pool raises "Too many connections" once a burst of requests exceeds its size."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis.from_pool(pool)


class RedisProfileStore:
    """Profiles in Redis; owns ``client`` (``close`` closes it). The layout is ready for Redis
    Cluster (each script touches one user's keys, one slot; reads use a non-transactional
    pipeline), but this class is written for, and tested with, a standalone client."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "visrec",
        max_recent: int = MAX_RECENT,
        event_ttl_s: int = EVENT_TTL_S,
        clock: Clock = time.time,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix must not hold braces (hash tags), got {prefix!r}")
        _check_limits(max_recent, event_ttl_s)
        self.max_recent = max_recent
        self.event_ttl_s = event_ttl_s
        self.prefix = prefix
        self._client = client
        self._clock = clock
        self._add_script = client.register_script(_ADD_LUA)
        self._load_script = client.register_script(_LOAD_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "visrec",
        max_recent: int = MAX_RECENT,
        event_ttl_s: int = EVENT_TTL_S,
        timeout_s: float = 2.0,
        max_connections: int = 50,
    ) -> RedisProfileStore:
        """A store on ``redis://host:port/db``; connects lazily, on the first call."""
        client = redis_client(url, timeout_s=timeout_s, max_connections=max_connections)
        return cls(client, prefix=prefix, max_recent=max_recent, event_ttl_s=event_ttl_s)

    def keys(self, user_id: str) -> UserKeys:
        return user_keys(self.prefix, user_id)

    async def recent(self, user_ids: Sequence[str]) -> list[list[int]]:
        replies = await self._read(user_ids, lambda pipe, keys: pipe.lrange(keys.recent, 0, -1))
        return [[int(item) for item in reply] for reply in replies]

    async def seen(self, user_ids: Sequence[str]) -> list[set[int]]:
        replies = await self._read(user_ids, lambda pipe, keys: pipe.smembers(keys.seen))
        return [{int(item) for item in reply} for reply in replies]

    async def add(self, events: Sequence[Interaction]) -> int:
        head: list[str | int] = [self.max_recent, self.event_ttl_s, repr(float(self._clock()))]
        calls = [
            (self.keys(user).all, head + _event_args(group))
            for user, group in _by_user(events).items()
        ]
        if len(calls) == 1:
            # The usual call: one user. A plain EVALSHA is one round trip; a pipeline with a
            # script costs a second one (SCRIPT EXISTS) before it runs.
            keys, args = calls[0]
            return int(await self._add_script(keys=keys, args=args))
        applied = 0
        for batch in _batches(calls, BATCH_USERS):
            pipe = self._client.pipeline(transaction=False)
            for keys, args in batch:
                await self._add_script(keys=keys, args=args, client=pipe)
            applied += sum(int(n) for n in await pipe.execute())
        return applied

    async def load(self, histories: Mapping[str, Sequence[int]]) -> None:
        for batch in _batches(histories.items(), BATCH_USERS):
            pipe = self._client.pipeline(transaction=False)
            for user, history in batch:
                recent = recent_of(history, self.max_recent)
                seen = list(dict.fromkeys(int(i) for i in history))
                args = [len(recent), *recent, *seen]
                await self._load_script(keys=self.keys(user).all, args=args, client=pipe)
            await pipe.execute()

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):  # OSError covers refused connections and timeouts
            return False

    async def close(self) -> None:
        await self._client.aclose()

    async def memory_per_user(self, sample: Sequence[str]) -> float:
        """Mean bytes per user of ``sample`` (``MEMORY USAGE`` of their keys, every element
        counted; a user without keys counts 0)."""
        if not sample:
            raise ValueError("memory_per_user needs at least one user id")
        pipe = self._client.pipeline(transaction=False)
        for user in sample:
            for key in self.keys(user).all:
                pipe.memory_usage(key, samples=0)
        sizes = await pipe.execute()
        return sum(int(size or 0) for size in sizes) / len(sample)

    async def _read(
        self, user_ids: Sequence[str], queue: Callable[[Pipeline, UserKeys], object]
    ) -> list[Any]:
        """Replies of ``queue``'s one command per user, one round trip per batch of users."""
        replies: list[Any] = []
        for batch in _batches(user_ids, BATCH_USERS):
            pipe = self._client.pipeline(transaction=False)
            for user in batch:
                queue(pipe, self.keys(user))
            replies.extend(await pipe.execute())
        return replies
