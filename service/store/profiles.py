"""User profiles for serving: each user's recent items (the model's input) and every item they
have seen (excluded from recommendations).

Two stores share one contract, :class:`ProfileStore`: :class:`MemoryProfileStore` in-process,
and :class:`RedisProfileStore`, where several API workers share profiles. Item ids are the
dataset's raw ids, not model indices: integers in ``[0, MAX_ITEM_ID]``. Both stores refuse
others (``ValueError``; ``TypeError`` for non-integers) before changing anything.

Redis key layout, for prefix ``visrec`` and user ``alice``::

    visrec:{u:alice}:p    string: the profile, encoded as below
    visrec:{u:alice}:ev   sorted set: applied event id -> time applied (seconds); with a TTL,
                          and the newest MAX_EVENT_IDS ids at most. Only exists while events
                          with ids were applied in the last TTL.
    visrec:{u:alice}:evp  hash: applied event id -> "item:time given in ms" (empty: none), to
                          refuse an id sent again for another event; same TTL as :ev.

The profile is one string: the byte 0xFE, then unsigned LEB128 varints (7 bits a byte, low bits
first, the high bit set on every byte but a number's last)::

    n, recent_1 .. recent_n, time_1, time_2 - time_1, .., seen_1, seen_2 - seen_1, ...

``recent`` oldest first by event time (ms; ties by arrival), with each item's latest event
time; ``seen`` sorted ascending and stored as gaps. A profile written before times were kept
starts with n itself (< 0x80) and has no times: it reads as times 0, older than any live event,
and the next write rewrites it. No user, no key (an empty profile is never stored).

Why one string: a Redis key costs about 60 bytes of overhead (dict entry, key, object) before
its value, and a set of small integers about 2 bytes an item (4 beyond 32767,
a hash table of ~50 bytes an item beyond 512 items). One key whose gaps mostly fit one byte
(a user's ~100 items out of 1682 are ~16 apart) is about 3x smaller on MovieLens-100K histories,
and a read is one ``GET`` of one key. Lua numbers are doubles, hence ``MAX_ITEM_ID = 2**53 - 1``.

An update is one Lua script for the whole call, all its users (atomic: Redis runs it to
completion before any other command; declared as writing, it is refused whole when Redis is out
of memory). It first checks every event id against the log and refuses the call if one was used
for another item or time; then, per user, it decodes ``recent`` and walks ``seen`` only up to
the last new item's place, copying the bytes before and after unchanged; so an update is O(seen)
in the worst case (bytes copied, and varints decoded when a new item sorts last): about 0.2 us
of Redis time per item walked, so ~0.15 ms for MovieLens-100K's heaviest user (732 items) but
~2-4 ms for one with 20 000. Fine for profiles of a few thousand items; far heavier users would
want ``seen`` split into blocks (each headed by its first id and byte length, so a walk skips
whole blocks).

The ``{u:...}`` hash tag puts all of a user's keys in one Redis Cluster slot, so a call for one
user runs on one node; on a cluster (``redis+cluster://`` URLs) a call for several users is one
script call per user. The user id inside it is percent-encoded, so ids holding
``{``, ``}``, ``:`` or ``%`` can neither break the tag nor collide with another user's keys.

Faults: when Redis cannot answer now (down, refusing connections, slower than the deadline, out
of pooled connections, loading, refusing writes), a call raises :class:`StoreUnavailable`
(``ping`` and ``durable`` say so instead); other errors, those of a bad call, stay what they
are. ``RedisProfileStore`` bounds ``profiles``, ``ping`` and ``durable`` by one deadline
(``deadline_s``) and ``add`` by another (``write_deadline_s``), each covering the wait for a
pooled connection, connecting and the reply, so a slow Redis costs a caller at most that long.
Only the time the event loop was free to read Redis's reply counts (``service.store.deadline``):
a loop busy with other requests does not turn a healthy Redis's prompt reply into a timeout.

A write that timed out may still have been applied. Sent again with the same event ids, each
event is applied once, as long as its id is still logged: for ``EVENT_TTL_S`` (7 days), and
among the user's newest ``MAX_EVENT_IDS`` (10,000) ids (one user's log was bounded by the TTL
alone: 1.87 M ids in 40 s took 748 MiB in process, 120 MiB per 296 k in Redis; ids are at most
128 characters, so a user's log now holds at most ~2 MB). Events without ids are applied
again, which leaves the same profile only if nothing else reached the user in between (then
``recent`` and ``seen`` are unchanged): give events ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import re
import time
from collections import OrderedDict
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from itertools import accumulate, islice
from typing import Any, Protocol, SupportsIndex, TypeVar
from urllib.parse import quote

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.cluster import ClusterNode

from service.store.deadline import LoopLag, deadline

MAX_RECENT = 9
EVENT_TTL_S = 7 * 24 * 3600
MAX_EVENT_IDS = 10_000  # per user: a retry after more newer events of that user applies again
MAX_ITEM_ID = 2**53 - 1  # the largest integer a Lua number (a double) holds exactly
MAX_TIMESTAMP_S = 4_102_444_800  # 2100-01-01: times are kept in ms, exact in a double
# Users per pipeline round trip in bulk calls: bounds the client's buffers, not correctness.
BATCH_USERS = 1000

T = TypeVar("T")
Clock = Callable[[], float]


class StoreUnavailable(Exception):
    """The store cannot answer now (see the module docstring): reads may fall back to what the
    caller has, writes should be refused and retried later.

    ``maybe_applied``: whether a refused write may have been applied all the same (the call
    reached the store and its reply was lost or late). False when the store certainly applied
    nothing: it refused the call (out of memory, read-only, loading, ...) or was never reached.
    """

    def __init__(self, reason: str, *, maybe_applied: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.maybe_applied = maybe_applied


class EventConflict(ValueError):
    """Event ids already applied (or repeated in the call) with another item or timestamp: the
    call is refused whole, nothing applied."""

    def __init__(self, event_ids: Sequence[str]) -> None:
        names = ", ".join(sorted(event_ids))
        super().__init__(f"event id(s) already used for another item or timestamp: {names}")
        self.event_ids = sorted(event_ids)


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: int  # raw item id (as in the dataset), not a model index
    # When it happened (seconds since the epoch); None: when the store receives it. Profiles
    # are ordered by it, ties by arrival.
    timestamp: float | None = None
    event_id: str | None = None  # retries with the same id are applied once; "" means none


@dataclass(frozen=True)
class Profile:
    recent: list[int]  # the last <= max_recent distinct items by event time, oldest first
    seen: frozenset[int]  # every item interacted with
    # Each recent item's latest event time, in milliseconds (0: loaded history, older than any
    # live event); compared only when placing new events, so equality ignores it.
    times: tuple[int, ...] = field(default=(), compare=False)


class ProfileStore(Protocol):
    max_recent: int

    async def profiles(self, user_ids: Sequence[str]) -> list[Profile]:
        """Per user, their profile (empty for unknown users); one round trip per batch."""
        ...

    async def recent(self, user_ids: Sequence[str]) -> list[list[int]]:
        """Per user, their last <= ``max_recent`` distinct item ids, oldest first."""
        ...

    async def seen(self, user_ids: Sequence[str]) -> list[set[int]]:
        """Per user, every item id they interacted with."""
        ...

    async def add(self, events: Sequence[Interaction]) -> int:
        """Apply ``events``, skipping already-applied event ids; returns how many were applied.
        A call is atomic: all of it or none of it. Raises EventConflict, applying nothing, for
        an event id applied before (within the TTL) or repeated with another item or time."""
        ...

    async def load(self, histories: Mapping[str, Sequence[int]]) -> None:
        """Replace each given user's profile by their history (raw item ids, oldest first)."""
        ...

    async def ping(self) -> bool:
        """Whether the store answers; never raises."""
        ...

    async def durable(self) -> bool | None:
        """Whether an acknowledged write survives a crash of the store's process or machine
        (None: unknown); never raises."""
        ...

    async def replication(self) -> str | None:
        """On a cluster, whether every node's writes have a replica to survive it (None: not a
        cluster, or unknown); never raises."""
        ...

    async def write_refusal(self) -> str | None:
        """Why the store would refuse a write now (out of memory, read-only), or None when it
        would take one or cannot tell; never raises."""
        ...

    async def close(self) -> None: ...


class ProfileReads:
    """``recent`` and ``seen`` derived from ``profiles``, the one read a store implements."""

    async def profiles(self, user_ids: Sequence[str]) -> list[Profile]:
        raise NotImplementedError

    async def recent(self, user_ids: Sequence[str]) -> list[list[int]]:
        return [p.recent for p in await self.profiles(user_ids)]

    async def seen(self, user_ids: Sequence[str]) -> list[set[int]]:
        return [set(p.seen) for p in await self.profiles(user_ids)]


def recent_of(history: Iterable[int], max_recent: int) -> list[int]:
    """The last ``max_recent`` distinct items of ``history``, oldest first, each at its latest
    occurrence: exactly what replaying ``history`` through ``add`` leaves in ``recent``."""
    picked: dict[int, None] = {}  # a dict keeps insertion order, newest first here
    for item in reversed(list(history)):
        if len(picked) == max_recent:
            break
        picked.setdefault(int(item), None)
    return list(reversed(picked))


def item_id(item: SupportsIndex) -> int:
    """``item`` as an int (numpy integers welcome); a ``ValueError`` outside [0, MAX_ITEM_ID]."""
    value = operator.index(item)
    if not 0 <= value <= MAX_ITEM_ID:
        raise ValueError(f"item ids must be integers in [0, 2**53 - 1], got {value}")
    return value


def _check_events(events: Iterable[Interaction]) -> None:
    for event in events:
        item_id(event.item_id)
        if event.timestamp is not None and not 0 <= event.timestamp <= MAX_TIMESTAMP_S:
            raise ValueError(f"timestamps must be in [0, {MAX_TIMESTAMP_S}], got {event.timestamp}")


def millis(seconds: float) -> int:
    return round(seconds * 1000)


def payload(event: Interaction) -> str:
    """What an event id stands for: its item and the timestamp given (none: arrival time)."""
    ts = "" if event.timestamp is None else str(millis(event.timestamp))
    return f"{int(event.item_id)}:{ts}"


def place(recent: list[int], times: list[int], item: int, at_ms: int, max_recent: int) -> None:
    """Put an event of ``item`` at ``at_ms`` into ``recent`` (oldest first, ``times`` beside it):
    an item is placed at its latest event, after items of the same time (ties by arrival); the
    oldest beyond ``max_recent`` leaves. The Lua script's ``place`` is the same rule."""
    if item in recent:
        j = recent.index(item)
        if times[j] > at_ms:
            return  # an older event of an item already placed later
        del recent[j], times[j]
    at = len(recent)
    while at > 0 and times[at - 1] > at_ms:
        at -= 1
    recent.insert(at, item)
    times.insert(at, at_ms)
    if len(recent) > max_recent:
        del recent[0], times[0]


def _check_histories(histories: Mapping[str, Sequence[int]]) -> None:
    for history in histories.values():
        for item in history:
            item_id(item)


def _check_limits(max_recent: int, event_ttl_s: int, max_event_ids: int) -> None:
    if max_recent < 1:
        raise ValueError(f"max_recent must be at least 1, got {max_recent}")
    if event_ttl_s < 1:
        raise ValueError(f"event_ttl_s must be at least 1 second, got {event_ttl_s}")
    if max_event_ids < 1:
        raise ValueError(f"max_event_ids must be at least 1, got {max_event_ids}")


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


# --------------------------------------------------------------------------- the encoding


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _varints(data: bytes) -> list[int]:
    """Every varint of ``data``. Most are one byte, so the loop's cheap branch comes first."""
    values: list[int] = []
    value = shift = 0
    for byte in data:
        if byte < 0x80:
            values.append(value | byte << shift)
            value = shift = 0
        else:
            value |= (byte & 0x7F) << shift
            shift += 7
    return values


VERSION_2 = 0xFE  # first byte of a profile with event times; never a v1 profile's first


def encode_profile(
    recent: Sequence[int], seen: Iterable[int], times: Sequence[int] | None = None
) -> bytes:
    """The stored form of a profile (see the module docstring); ``b""`` when it is empty.
    ``seen`` may hold repeats; ids must already be checked (:func:`item_id`). ``times``: of
    ``recent``, in ms, non-decreasing (None: all 0, as for a loaded history)."""
    ordered = sorted(set(seen))
    if not ordered and not recent:
        return b""
    times = list(times) if times is not None else [0] * len(recent)
    out = bytearray([VERSION_2])
    _put_varint(out, len(recent))
    for item in recent:
        _put_varint(out, item)
    previous = 0
    for value in times:
        _put_varint(out, value - previous)
        previous = value
    previous = 0
    for item in ordered:
        _put_varint(out, item - previous)
        previous = item
    return bytes(out)


def decode_profile(data: bytes | None) -> Profile:
    """The profile stored as ``data`` (``None``, a missing key, is the empty profile); reads
    profiles stored before event times were (their times are 0) as well."""
    if not data:
        return Profile([], frozenset())
    if data[0] != VERSION_2:
        values = _varints(data)
        end = values[0] + 1
        recent = values[1:end]
        return Profile(recent, frozenset(accumulate(values[end:])), (0,) * len(recent))
    values = _varints(data[1:])
    n = values[0]
    recent, gaps = values[1 : n + 1], values[n + 1 : 2 * n + 1]
    return Profile(recent, frozenset(accumulate(values[2 * n + 1 :])), tuple(accumulate(gaps)))


# --------------------------------------------------------------------------- in-process store


@dataclass
class _Profile:
    recent: list[int] = field(default_factory=list)  # oldest first
    times: list[int] = field(default_factory=list)  # of recent, ms
    seen: set[int] = field(default_factory=set)
    # event id -> (time applied, payload), oldest first: expired ids leave from the front, so a
    # write costs O(its events + expired ids), not a copy of the user's whole log
    events: OrderedDict[str, tuple[float, str]] = field(default_factory=OrderedDict)


class MemoryProfileStore(ProfileReads):
    """Profiles in a dict: the default when no Redis is configured (one process, lost on exit).

    It keeps the ``max_users`` users read or written most recently (LRU, ~700-900 bytes each
    with a ~100-item history): beyond that the least recent user is forgotten, counted in
    ``evicted`` and reported to ``on_evict`` (the service's /metrics)."""

    def __init__(
        self,
        max_recent: int = MAX_RECENT,
        *,
        event_ttl_s: int = EVENT_TTL_S,
        max_event_ids: int = MAX_EVENT_IDS,
        clock: Clock = time.time,
        max_users: int | None = None,
        on_evict: Callable[[], object] = lambda: None,
    ) -> None:
        _check_limits(max_recent, event_ttl_s, max_event_ids)
        self.max_event_ids = max_event_ids
        if max_users is not None and max_users < 1:
            raise ValueError(f"max_users must be at least 1, got {max_users}")
        self.max_recent = max_recent
        self.event_ttl_s = event_ttl_s
        self.max_users = max_users
        self.evicted = 0
        self._on_evict = on_evict
        self._clock = clock
        self._profiles: OrderedDict[str, _Profile] = OrderedDict()  # least recent first
        # Updates have no await inside today, but the lock keeps them atomic if one ever does.
        self._lock = asyncio.Lock()

    async def profiles(self, user_ids: Sequence[str]) -> list[Profile]:
        async with self._lock:
            return [self._snapshot(u) for u in user_ids]

    async def add(self, events: Sequence[Interaction]) -> int:
        _check_events(events)
        async with self._lock:
            now = self._clock()
            groups = _by_user(events)
            for user in groups:
                self._forget_expired(user, now)
            conflicts = [c for user, group in groups.items() for c in self._conflicts(user, group)]
            if conflicts:
                raise EventConflict(conflicts)
            applied = sum(self._apply(user, group, now) for user, group in groups.items())
            self._evict()
            return applied

    async def load(self, histories: Mapping[str, Sequence[int]]) -> None:
        _check_histories(histories)
        async with self._lock:
            for user, history in histories.items():
                recent = recent_of(history, self.max_recent)
                self._profiles[user] = _Profile(
                    recent, [0] * len(recent), {int(i) for i in history}
                )
                self._profiles.move_to_end(user)
            self._evict()

    async def ping(self) -> bool:
        return True

    async def durable(self) -> bool | None:
        return False  # lost with the process

    async def replication(self) -> str | None:
        return None

    async def write_refusal(self) -> str | None:
        return None

    async def close(self) -> None:
        return None

    def _snapshot(self, user_id: str) -> Profile:
        # Readers must not create profiles for unknown users (that would grow without bound).
        profile = self._profiles.get(user_id)
        if profile is None:
            return Profile([], frozenset())
        self._profiles.move_to_end(user_id)
        return Profile(list(profile.recent), frozenset(profile.seen), tuple(profile.times))

    def _evict(self) -> None:
        while self.max_users is not None and len(self._profiles) > self.max_users:
            self._profiles.popitem(last=False)
            self.evicted += 1
            self._on_evict()

    def _forget_expired(self, user_id: str, now: float) -> None:
        """Same rule as the Redis script: ids older than the TTL are forgotten first."""
        profile = self._profiles.get(user_id)
        if profile is None:
            return
        cutoff = now - self.event_ttl_s
        while profile.events and next(iter(profile.events.values()))[0] <= cutoff:
            profile.events.popitem(last=False)

    def _conflicts(self, user_id: str, events: list[Interaction]) -> list[str]:
        profile = self._profiles.get(user_id)
        known = profile.events if profile else {}
        claimed: dict[str, str] = {}
        conflicts = []
        for event in events:
            if not event.event_id:
                continue
            logged = known.get(event.event_id)
            first = claimed.setdefault(event.event_id, logged[1] if logged else payload(event))
            if first != payload(event):
                conflicts.append(event.event_id)
        return conflicts

    def _apply(self, user_id: str, events: list[Interaction], now: float) -> int:
        profile = self._profiles.setdefault(user_id, _Profile())
        self._profiles.move_to_end(user_id)
        applied = 0
        for event in events:
            if event.event_id and event.event_id in profile.events:
                continue
            at_ms = millis(now if event.timestamp is None else event.timestamp)
            item = int(event.item_id)
            place(profile.recent, profile.times, item, at_ms, self.max_recent)
            profile.seen.add(item)
            if event.event_id:
                profile.events[event.event_id] = (now, payload(event))
            applied += 1
        while len(profile.events) > self.max_event_ids:  # the oldest ids go first
            profile.events.popitem(last=False)
        return applied


# --------------------------------------------------------------------------- Redis store

# Redis 7 script flags. A script with a shebang and without ``no-writes`` is known to write
# before it runs: Redis refuses it whole (OOM) when used memory is over maxmemory. Without one,
# Redis checks only the first write command, and after it lets every later write of the script
# through: the add script's first command, ZREMRANGEBYSCORE, made every script run past
# maxmemory (40 batches of 1,000 new users acknowledged and 10 MB over a 1 MB limit).
_SHEBANG = "#!lua\n"

# Varints in Lua: numbers are doubles, exact for the ids allowed (< 2^53).
_VARINT_LUA = """
local function varint(x)
  local bytes = {}
  while x >= 128 do
    bytes[#bytes + 1] = x % 128 + 128
    x = math.floor(x / 128)
  end
  bytes[#bytes + 1] = x
  return string.char(unpack(bytes))
end

-- The varint starting at byte pos of s, and the position just after it.
local function read(s, pos)
  local x, scale, b = 0, 1, string.byte(s, pos)
  while b >= 128 do
    x = x + (b - 128) * scale
    scale = scale * 128
    pos = pos + 1
    b = string.byte(s, pos)
  end
  return x + b * scale, pos + 1
end
"""

# A call's events, atomically: Redis runs a script to completion before any other command, so
# no reader sees half an update, concurrent adds for one user cannot interleave, and a call of
# several users is applied whole (event-id conflicts are checked for all of them first).
# KEYS: per user, (profile, event log, event payloads). ARGV: max_recent, event_ttl_s, now (s),
# now (ms), max_event_ids, then per user: its number of events n, then n x (item, event_id,
# time in ms), with "" for no event id and for no time (then: now). Returns {applied} or
# {-1, conflicting ids...}.
_ADD_LUA = (
    _SHEBANG
    + _VARINT_LUA
    + """
local max_recent, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, now_ms, max_ids = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local cutoff = now - ttl

-- The rule of profiles.place: an item sits at its latest event, after items of the same time.
local function place(recent, times, item, t)
  for j = 1, #recent do
    if recent[j] == item then
      if times[j] > t then return end
      table.remove(recent, j)
      table.remove(times, j)
      break
    end
  end
  local at = #recent + 1
  while at > 1 and times[at - 1] > t do at = at - 1 end
  table.insert(recent, at, item)
  table.insert(times, at, t)
  if #recent > max_recent then
    table.remove(recent, 1)
    table.remove(times, 1)
  end
end

-- Pass 1: read the call, and refuse it whole if an event id is taken by another payload.
local users, conflicts, a = {}, {}, 6
while a <= #ARGV do
  local k = #users * 3
  local log, payloads = KEYS[k + 2], KEYS[k + 3]
  local events, claimed = {}, {}
  for i = 1, tonumber(ARGV[a]) do
    local item, id, t = ARGV[a + 3 * i - 2], ARGV[a + 3 * i - 1], ARGV[a + 3 * i]
    local payload = item .. ':' .. t
    if id ~= '' then
      if claimed[id] == nil then
        local at = redis.call('ZSCORE', log, id)
        claimed[id] = payload
        if at and tonumber(at) > cutoff then
          claimed[id] = redis.call('HGET', payloads, id) or payload  -- none: logged before payloads
        end
      end
      if claimed[id] ~= payload then conflicts[#conflicts + 1] = id end
    end
    events[i] = {tonumber(item), id, t == '' and now_ms or tonumber(t), payload}
  end
  users[#users + 1] = {KEYS[k + 1], log, payloads, events}
  a = a + 1 + 3 * #events
end
if #conflicts > 0 then return {-1, unpack(conflicts)} end

-- Pass 2: apply, user by user.
local applied = 0
for _, user in ipairs(users) do
  local key, log, payloads, events = user[1], user[2], user[3], user[4]
  local expired = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    for i = 1, #expired, 1000 do
      redis.call('HDEL', payloads, unpack(expired, i, math.min(i + 999, #expired)))
    end
  end
  local data = redis.call('GET', key) or ''

  -- recent and its times: decoded in full (they are short); pos ends on the first byte of seen.
  local recent, times, pos = {}, {}, 1
  if #data > 0 then
    local v2 = string.byte(data, 1) == 254
    local n
    if v2 then pos = 2 end
    n, pos = read(data, pos)
    for i = 1, n do recent[i], pos = read(data, pos) end
    local t = 0
    for i = 1, n do
      if v2 then
        local gap
        gap, pos = read(data, pos)
        t = t + gap
      end
      times[i] = t
    end
  end

  local new, fresh, count, logged = {}, {}, 0, false
  for _, e in ipairs(events) do
    local item, id = e[1], e[2]
    if id == '' or not redis.call('ZSCORE', log, id) then
      place(recent, times, item, e[3])
      if not fresh[item] then
        fresh[item] = true
        new[#new + 1] = item
      end
      if id ~= '' then
        redis.call('ZADD', log, now, id)
        redis.call('HSET', payloads, id, e[4])
        logged = true
      end
      count = count + 1
    end
  end
  if logged then
    redis.call('EXPIRE', log, ttl)
    redis.call('EXPIRE', payloads, ttl)
    local excess = redis.call('ZCARD', log) - max_ids
    if excess > 0 then  -- the oldest ids go first
      local old = redis.call('ZRANGE', log, 0, excess - 1)
      redis.call('ZREMRANGEBYRANK', log, 0, excess - 1)
      for i = 1, #old, 1000 do
        redis.call('HDEL', payloads, unpack(old, i, math.min(i + 999, #old)))
      end
    end
  end
  if count > 0 then
    table.sort(new)
    -- seen: merge the sorted new items in one walk. Bytes from `from` to `at` - 1 are copied
    -- unchanged; `orig` is the last stored item walked past, `last` the last item written. A
    -- stored gap is relative to orig, so it is re-encoded only where an insert made last ~= orig.
    local out, from, at, orig, last = {}, pos, pos, 0, 0
    for _, x in ipairs(new) do
      local v, nxt = nil, nil
      while at <= #data do
        local gap = string.byte(data, at)
        if gap < 128 then nxt = at + 1 else gap, nxt = read(data, at) end
        v = orig + gap
        if v >= x then break end
        if last ~= orig then
          out[#out + 1] = varint(v - last)
          from = nxt
        end
        orig, last, at, v = v, v, nxt, nil
      end
      if v ~= x then  -- not stored yet: insert it before the item at `at`
        out[#out + 1] = string.sub(data, from, at - 1)
        out[#out + 1] = varint(x - last)
        last, from = x, at
      end
    end
    if at <= #data and last ~= orig then
      local gap, nxt = read(data, at)
      out[#out + 1] = string.sub(data, from, at - 1) .. varint(orig + gap - last)
      from = nxt
    end
    out[#out + 1] = string.sub(data, from)

    local head = {string.char(254), varint(#recent)}
    for i = 1, #recent do head[#head + 1] = varint(recent[i]) end
    local previous = 0
    for i = 1, #times do
      head[#head + 1] = varint(times[i] - previous)
      previous = times[i]
    end
    redis.call('SET', key, table.concat(head) .. table.concat(out))
    applied = applied + count
  end
end
return {applied}
"""
)

# Replace one user's profile atomically. KEYS: profile, event log, event payloads. ARGV: the
# encoded profile.
_LOAD_LUA = (
    _SHEBANG
    + """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"""
)


@dataclass(frozen=True)
class UserKeys:
    profile: str
    events: str
    payloads: str

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.profile, self.events, self.payloads)


def user_keys(prefix: str, user_id: str) -> UserKeys:
    """The user's keys; see the module docstring. ``quote`` leaves only ``A-Za-z0-9_.-~``
    unescaped and escapes ``%`` itself, so the encoding is one-to-one and never holds ``}``."""
    base = f"{prefix}:{{u:{quote(user_id, safe='')}}}"
    return UserKeys(profile=f"{base}:p", events=f"{base}:ev", payloads=f"{base}:evp")


def _event_args(events: Sequence[Interaction]) -> list[str | int]:
    """One user's part of the add script's ARGV; int() turns numpy ids into ones Redis takes."""
    args: list[str | int] = [len(events)]
    for e in events:
        at = "" if e.timestamp is None else str(millis(e.timestamp))
        args += [int(e.item_id), e.event_id or "", at]
    return args


# Replies that mean "not now" rather than "wrong call": a failed disk write (MISCONF), a script
# running too long (BUSY), too few replicas acknowledging (NOREPLICAS). A pipeline's error text is
# "Command # n (...) of pipeline caused error: ('MISCONF ...',)": the code is looked for after it.
_NOT_NOW_REPLY = re.compile(r"(?:^|caused error: \(['\"])(MISCONF|BUSY|NOREPLICAS)\b")
_NOT_NOW = (
    OSError,  # refused or reset connections, and the deadline (TimeoutError is an OSError)
    rx.ConnectionError,  # also a pool without a free connection, and LOADING after a restart
    rx.TimeoutError,
    rx.OutOfMemoryError,
    rx.ReadOnlyError,
    rx.TryAgainError,
    rx.ClusterDownError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot answer now, as opposed to a bad call (a script error,
    a wrong argument), which should stay an error."""
    if isinstance(exc, _NOT_NOW):
        return True
    return isinstance(exc, rx.ResponseError) and _NOT_NOW_REPLY.search(str(exc)) is not None


# Refusals after which the store certainly applied nothing: it said no before running anything
# (a script declared as writing is refused whole when Redis is out of memory, read-only or
# loading; a transaction refused at EXEC runs none of its commands), or it was never reached.
_REFUSED = (
    rx.OutOfMemoryError,
    rx.ReadOnlyError,
    rx.BusyLoadingError,
    rx.TryAgainError,
    ConnectionRefusedError,
)


def nothing_applied(exc: BaseException) -> bool:
    """Whether a write that failed with ``exc`` (an outage) certainly changed nothing."""
    if isinstance(exc, (*_REFUSED, rx.ResponseError)):
        return True  # a ResponseError here is MISCONF, BUSY or NOREPLICAS: refused up front
    text = str(exc)
    return isinstance(exc, rx.ConnectionError) and (
        (text.startswith("Error ") and " connecting to " in text)  # never connected
        or text == "No connection available."  # waited for the pool, sent nothing
    )


def why_refused(exc: BaseException) -> str:
    """A short reason for an outage, in words an operator can act on."""
    if isinstance(exc, rx.OutOfMemoryError):
        return "Redis is out of memory (used_memory over maxmemory, noeviction): writes refused"
    if isinstance(exc, rx.ReadOnlyError):
        return "Redis is a read-only replica: writes refused"
    if isinstance(exc, rx.BusyLoadingError):
        return "Redis is loading its data after a restart"
    if isinstance(exc, TimeoutError | rx.TimeoutError):
        return "Redis did not answer within the deadline"
    return "Redis did not answer"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def write_refusal(info: Mapping[str, object]) -> str | None:
    """Why a Redis whose ``INFO`` reads ``info`` refuses writes, or None."""
    used, limit = _int(info.get("used_memory")), _int(info.get("maxmemory"))
    if limit and used >= limit and info.get("maxmemory_policy") == "noeviction":
        return (
            f"Redis is out of memory ({used:,} bytes used of maxmemory {limit:,}, noeviction): "
            "writes are refused until memory is freed or maxmemory raised"
        )
    if info.get("role") == "slave" and _int(info.get("slave_read_only")):
        return "Redis is a read-only replica: writes are refused"
    return None


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0


@asynccontextmanager
async def reaching(deadline_s: float | None, lag: LoopLag) -> AsyncIterator[None]:
    """Redis calls within ``deadline_s`` of responsive loop time (None: no deadline), with
    outages raised as StoreUnavailable and bad calls left as they are. A call cut off by the
    deadline leaves no half-read reply behind: redis-py closes a connection interrupted
    mid-command instead of returning it to the pool."""
    try:
        async with deadline(deadline_s, lag):
            yield
    except Exception as exc:
        if is_outage(exc):
            cause = f"{why_refused(exc)} ({type(exc).__name__}: {exc})"
            raise StoreUnavailable(cause, maybe_applied=not nothing_applied(exc)) from exc
        raise


CLUSTER_SCHEME = "redis+cluster://"


def redis_client(
    url: str, *, timeout_s: float = 2.0, max_connections: int = 200
) -> aioredis.Redis | aioredis.RedisCluster:
    """A client whose pool makes callers wait (up to ``timeout_s``) for a free connection: the
    default pool raises "Too many connections" once a burst of requests exceeds its size.

    ``redis+cluster://host:port[,host:port...]`` names a Redis Cluster by one or more of its
    nodes (the client finds the others and follows slot moves and failovers); the pool size is
    then per node."""
    if url.startswith(CLUSTER_SCHEME):
        nodes = [
            _cluster_node(n) for n in url.removeprefix(CLUSTER_SCHEME).split("/")[0].split(",")
        ]
        return aioredis.RedisCluster(
            startup_nodes=nodes,
            max_connections=max_connections,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
    return _single_client(url, timeout_s=timeout_s, max_connections=max_connections)


def _single_client(url: str, *, timeout_s: float, max_connections: int) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis.from_pool(pool)


def _cluster_node(address: str) -> ClusterNode:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a Redis Cluster URL lists host:port nodes, got {address!r}")
    return ClusterNode(host, int(port))


class RedisProfileStore(ProfileReads):
    """Profiles in Redis; owns ``client`` (``close`` closes it), which must return bytes (no
    ``decode_responses``: profiles are binary): a single Redis or a Redis Cluster (each script
    touches one user's keys, one slot; reads use a non-transactional pipeline, which a cluster
    client splits by node). ``tests/test_cluster.py`` runs it on a real cluster."""

    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        *,
        prefix: str = "visrec",
        max_recent: int = MAX_RECENT,
        event_ttl_s: int = EVENT_TTL_S,
        max_event_ids: int = MAX_EVENT_IDS,
        clock: Clock = time.time,
        deadline_s: float | None = None,
        write_deadline_s: float | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 200,
        timeout_s: float = 2.0,
        max_connections: int = 200,
    ) -> None:
        """``deadline_s``: the most ``profiles``, ``ping`` and ``durable`` wait in all (None:
        only the client's socket timeouts bound them); ``write_deadline_s``: the same for
        ``add`` (None: ``deadline_s``). ``load`` has none: it is bulk work.

        ``wait_replicas`` > 0: ``add`` returns only once that many replicas have its writes
        (``WAIT``, up to ``wait_timeout_ms``), else raises StoreUnavailable (maybe applied):
        then a failover, which promotes a replica, keeps every acknowledged write. On a
        cluster that takes a client of the user's primary (``timeout_s``, ``max_connections``:
        as the store's own client was made with)."""
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix must not hold braces (hash tags), got {prefix!r}")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the Redis client must not decode responses: profiles are binary")
        _check_limits(max_recent, event_ttl_s, max_event_ids)
        self.max_recent = max_recent
        self.event_ttl_s = event_ttl_s
        self.max_event_ids = max_event_ids
        self.prefix = prefix
        self._client = client
        self._clock = clock
        self.deadline_s = deadline_s
        self.write_deadline_s = deadline_s if write_deadline_s is None else write_deadline_s
        self._lag = LoopLag()  # the deadlines count Redis's time, not a busy loop's
        self.cluster = isinstance(client, aioredis.RedisCluster)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._timeout_s, self._max_connections = timeout_s, max_connections
        self._nodes: dict[str, aioredis.Redis] = {}  # a cluster's primaries, for WAIT
        self._refresh: asyncio.Task[None] | None = None
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
        max_connections: int = 200,
        deadline_s: float | None = None,
        write_deadline_s: float | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 200,
    ) -> RedisProfileStore:
        """A store on ``redis://host:port/db``; connects lazily, on the first call.
        ``timeout_s`` bounds each socket operation, the deadlines each request-path call."""
        client = redis_client(url, timeout_s=timeout_s, max_connections=max_connections)
        return cls(
            client,
            prefix=prefix,
            max_recent=max_recent,
            event_ttl_s=event_ttl_s,
            deadline_s=deadline_s,
            write_deadline_s=write_deadline_s,
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
            timeout_s=timeout_s,
            max_connections=max_connections,
        )

    def keys(self, user_id: str) -> UserKeys:
        return user_keys(self.prefix, user_id)

    def _reaching(self, deadline_s: float | None) -> AbstractAsyncContextManager[None]:
        return reaching(deadline_s, self._lag)

    async def profiles(self, user_ids: Sequence[str]) -> list[Profile]:
        """One ``GET`` per user, pipelined: one round trip per ``BATCH_USERS`` users."""
        blobs: list[bytes | None] = []
        async with self._reaching(self.deadline_s):
            for batch in _batches(user_ids, BATCH_USERS):
                async with self._client.pipeline(transaction=False) as pipe:
                    for user in batch:
                        pipe.get(self.keys(user).profile)
                    blobs.extend(await pipe.execute())
        return [decode_profile(blob) for blob in blobs]

    async def add(self, events: Sequence[Interaction]) -> int:
        """One script call for the whole call: applied whole or not at all (refused whole when
        Redis is out of memory). On a Redis Cluster a call's users live in different slots, so
        it is one script call per user, all at once: each user's events are applied whole or
        not at all, and an event id conflict refuses that user's events only."""
        return await self._add(events, deadline_s=self.write_deadline_s)

    async def _add(self, events: Sequence[Interaction], *, deadline_s: float | None) -> int:
        _check_events(events)
        groups, now = list(_by_user(events).items()), self._clock()
        calls = [[group] for group in groups] if self.cluster else [groups]
        async with self._reaching(deadline_s):
            replies = await asyncio.gather(*(self._add_call(c, now) for c in calls))
        conflicts = [x.decode() if isinstance(x, bytes) else str(x)
                     for r in replies if int(r[0]) < 0 for x in r[1:]]  # fmt: skip
        if conflicts:
            raise EventConflict(conflicts)
        return sum(int(r[0]) for r in replies)

    async def _add_call(
        self, groups: Sequence[tuple[str, Sequence[Interaction]]], now: float
    ) -> list[Any]:
        keys: list[str] = []
        args: list[str | int] = [
            self.max_recent,
            self.event_ttl_s,
            repr(float(now)),
            millis(now),
            self.max_event_ids,
        ]
        for user, group in groups:
            keys += self.keys(user).all
            args += _event_args(group)
        if not self.wait_replicas:
            return list(await self._add_script(keys=keys, args=args))
        return await self._replicated(keys, args)

    async def _replicated(self, keys: list[str], args: list[str | int]) -> list[Any]:
        """The add script, then ``WAIT`` on the same connection (WAIT counts the replicas that
        have that connection's writes), on the node that holds ``keys``."""
        try:
            async with (await self._node_of(keys[0])).client() as conn:
                reply = list(await self._add_script(keys=keys, args=args, client=conn))
                wait = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
                acked = int(await conn.execute_command(*wait))
        except rx.MovedError as exc:  # refused by a node that no longer holds the slot
            self._find_nodes_again()
            raise StoreUnavailable(f"the cluster moved: {exc}", maybe_applied=False) from exc
        except BaseException:  # an outage, or the deadline: a failover, maybe
            self._find_nodes_again()
            raise
        if acked < self.wait_replicas:
            raise StoreUnavailable(
                f"the write reached {acked} of {self.wait_replicas} replica(s) within "
                f"{self.wait_timeout_ms} ms: not acknowledged (send it again with its event ids)",
                maybe_applied=True,
            )
        return reply

    async def _node_of(self, key: str) -> aioredis.Redis:
        """A client of the primary that holds ``key``: the store's own, or a cluster node's."""
        cluster = self._client
        if not isinstance(cluster, aioredis.RedisCluster):
            return cluster
        await cluster.initialize()  # a no-op once it knows the slots
        node = cluster.get_node_from_key(key)
        if node is None:  # a slot no primary holds: mid-failover
            raise rx.ClusterDownError(f"no primary holds {key!r} now")
        if node.name not in self._nodes:  # pooled as the store's own client is
            self._nodes[node.name] = _single_client(
                f"redis://{node.host}:{node.port}",
                timeout_s=self._timeout_s,
                max_connections=self._max_connections,
            )
        return self._nodes[node.name]

    def _find_nodes_again(self) -> None:
        """Ask the cluster again which primary holds which slots, in the background (a
        request's deadline must not cut it short), once at a time."""
        cluster = self._client
        if isinstance(cluster, aioredis.RedisCluster) and (
            self._refresh is None or self._refresh.done()
        ):
            self._refresh = asyncio.create_task(self._refreshed(cluster))

    @staticmethod
    async def _refreshed(cluster: aioredis.RedisCluster) -> None:
        with contextlib.suppress(rx.RedisError, OSError):  # mid-failover: the next one will
            await cluster.nodes_manager.initialize()

    async def load(self, histories: Mapping[str, Sequence[int]]) -> None:
        _check_histories(histories)  # all of them first: a bad id must not leave half a load
        async with self._reaching(None):
            if self.cluster:  # a cluster's pipelines do not load scripts: on every primary now
                await self._client.script_load(_LOAD_LUA)
            for batch in _batches(histories.items(), BATCH_USERS):
                async with self._client.pipeline(transaction=False) as pipe:
                    for user, history in batch:
                        items = [int(i) for i in history]
                        blob = encode_profile(recent_of(items, self.max_recent), items)
                        await self._load_script(
                            keys=self.keys(user).all,
                            args=[blob],
                            client=pipe,  # type: ignore[arg-type]
                        )  # a ClusterPipeline takes script calls as a Pipeline does
                    await pipe.execute()

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}:epoch"

    async def read_epoch(self) -> str | None:
        """The data set's epoch token (``service.store.epoch``); None when missing."""
        async with self._reaching(self.deadline_s):
            value = await self._client.get(self.epoch_key)
        return _text(value) if value is not None else None

    async def claim_epoch(self, token: str) -> str:
        """Store ``token`` as the epoch unless one exists; the epoch stored now."""
        async with self._reaching(self.write_deadline_s):
            await self._client.set(self.epoch_key, token, nx=True)
            value = await self._client.get(self.epoch_key)
        return _text(value) if value is not None else token

    async def histories_loaded(self) -> bool:
        """Whether the dataset's histories were merged into this data set (see
        :mod:`service.store.epoch`): a key that goes with the data, as the epoch does."""
        async with self._reaching(self.deadline_s):
            return bool(await self._client.exists(f"{self.epoch_key}:loaded"))

    async def mark_histories_loaded(self) -> None:
        async with self._reaching(self.write_deadline_s):
            await self._client.set(f"{self.epoch_key}:loaded", "1")

    async def merge(self, histories: Mapping[str, Sequence[int]], chunk: int = 5000) -> None:
        """Add each user's history (raw item ids, oldest first) as events at time 0, older
        than any live event: unlike ``load``, what the users did since is kept. No deadline:
        it is bulk work, in calls of about ``chunk`` events."""
        _check_histories(histories)
        batch: list[Interaction] = []
        for user, history in histories.items():
            batch += [Interaction(user, int(i), 0.0) for i in history]
            if len(batch) >= chunk:
                await self._add(batch, deadline_s=None)
                batch = []
        if batch:
            await self._add(batch, deadline_s=None)

    async def ping(self) -> bool:
        try:
            async with self._reaching(self.deadline_s):
                return bool(await self._client.ping())
        except StoreUnavailable:
            return False

    async def durable(self) -> bool | None:
        """True when Redis appends every write to its AOF and fsyncs it before replying
        (``appendonly yes``, ``appendfsync always``): then an acknowledged write survives a
        crash of Redis or of its machine. None when Redis does not answer or hides its
        configuration (``CONFIG`` renamed away, as on some managed services)."""
        try:
            async with self._reaching(self.deadline_s):
                configs = await self._each_node(self._client.config_get, "append*")
        except (StoreUnavailable, rx.ResponseError):
            return None
        return all(
            c.get("appendonly") == "yes" and c.get("appendfsync") == "always" for c in configs
        )

    async def _each_node(self, command: Callable[..., Awaitable[Any]], *args: object) -> list[Any]:
        """``command``'s answer from Redis, or from every node of a cluster."""
        if not self.cluster:
            return [await command(*args)]
        answers = await command(*args, target_nodes=aioredis.RedisCluster.ALL_NODES)
        return list(answers.values())

    async def replication(self) -> str | None:
        """On a cluster, how far a write reaches: whether every primary has a replica to take
        over its slots (else durability is per node). None for a single Redis, or when the
        cluster does not answer."""
        client = self._client
        if not isinstance(client, aioredis.RedisCluster):
            return None
        try:
            async with self._reaching(self.deadline_s):
                nodes = await client.cluster_nodes()
        except (StoreUnavailable, rx.ResponseError):
            return None
        table: dict[str, dict[str, Any]] = nodes
        primaries = {  # a node that joins shows as a master without slots for a while
            n["node_id"] for n in table.values() if "master" in n["flags"] and n["slots"]
        }
        covered = {n["master_id"] for n in table.values() if "slave" in n["flags"]}
        bare = len(primaries - covered)
        if not bare:
            return f"Redis Cluster of {len(primaries)} primaries, each with a replica"
        return (
            f"Redis Cluster of {len(primaries)} primaries, {bare} without a replica: durability "
            "is per node (a lost primary loses its slots' data)"
        )

    async def write_refusal(self) -> str | None:
        """From ``INFO memory replication``: out of memory under ``noeviction``, or a read-only
        replica. None when Redis does not answer (``ping`` says that) or hides INFO."""
        try:
            async with self._reaching(self.deadline_s):
                infos = await self._each_node(
                    self._client.execute_command, "INFO", "memory", "replication"
                )
        except (StoreUnavailable, rx.ResponseError):
            return None
        primaries = [i for i in infos if not (self.cluster and i.get("role") == "slave")]
        return next((r for r in map(write_refusal, primaries) if r), None)

    async def close(self) -> None:
        await self._lag.stop()
        if self._refresh is not None:
            self._refresh.cancel()
        for node in self._nodes.values():
            await node.aclose()
        await self._client.aclose()

    async def memory_per_user(self, sample: Sequence[str]) -> float:
        """Mean bytes per user of ``sample`` (``MEMORY USAGE`` of all their keys, the event log
        included when it exists; a user without keys counts 0)."""
        if not sample:
            raise ValueError("memory_per_user needs at least one user id")
        async with self._client.pipeline(transaction=False) as pipe:
            for user in sample:
                for key in self.keys(user).all:
                    pipe.memory_usage(key, samples=0)
            sizes = await pipe.execute()
        return sum(int(size or 0) for size in sizes) / len(sample)
