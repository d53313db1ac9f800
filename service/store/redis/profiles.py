"""Profiles in Redis, shared by every worker and replica.

Redis key layout, for prefix ``visrec`` and user ``alice``::

    visrec:{u:alice}:p    string: the profile, encoded as service.store.codec says
    visrec:{u:alice}:ev   sorted set: applied event id -> time applied (seconds); with a TTL,
                          and the newest MAX_EVENT_IDS ids at most. Only exists while events
                          with ids were applied in the last TTL.
    visrec:{u:alice}:evp  hash: applied event id -> "item:time given in ms" (empty: none), to
                          refuse an id sent again for another event; same TTL as :ev.

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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis
from redis import exceptions as rx

from service.store.codec import decode_profile, encode_profile
from service.store.profiles import (
    BATCH_USERS,
    EVENT_TTL_S,
    MAX_EVENT_IDS,
    MAX_RECENT,
    Clock,
    EventConflict,
    Interaction,
    Profile,
    ProfileReads,
    StoreUnavailable,
    batches,
    by_user,
    check_events,
    check_histories,
    check_limits,
    millis,
    timed_recent,
)
from service.store.redis.client import (
    reaching,
    redis_client,
    reply_text,
)
from service.store.redis.deadline import LoopLag
from service.store.redis.health import cluster_replication, fsyncs_every_write, refusing_writes
from service.store.redis.replication import Replication

# before it runs: Redis refuses it whole (OOM) when used memory is over maxmemory. Without one,
# Redis checks only the first write command, and after it lets every later write of the script
# through: the add script's first command, ZREMRANGEBYSCORE, made every script run past
# maxmemory (40 batches of 1,000 new users acknowledged and 10 MB over a 1 MB limit).
_SHEBANG = "#!lua\n"

# The scripts, in ./lua/: the add script (a call's events, atomically, with the varint helpers
# it needs) and the load script (one user's profile replaced). Each file says what its KEYS and
# ARGV are.
_LUA = resources.files("service.store.redis") / "lua"


def _script(*names: str) -> str:
    return _SHEBANG + "".join((_LUA / f"{name}.lua").read_text() for name in names)


_ADD_LUA = _script("varint", "add")
_LOAD_LUA = _script("load")


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
        (:class:`~service.store.redis.replication.Replication`, with ``wait_timeout_ms``;
        ``timeout_s`` and ``max_connections`` as the store's own client was made with)."""
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix must not hold braces (hash tags), got {prefix!r}")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the Redis client must not decode responses: profiles are binary")
        check_limits(max_recent, event_ttl_s, max_event_ids)
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
        self._replication = Replication(
            client,
            replicas=wait_replicas,
            timeout_ms=wait_timeout_ms,
            timeout_s=timeout_s,
            max_connections=max_connections,
        )
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
            for batch in batches(user_ids, BATCH_USERS):
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
        check_events(events)
        groups, now = list(by_user(events).items()), self._clock()
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
        return await self._replication.write(self._add_script, keys, args)

    async def load(
        self,
        histories: Mapping[str, Sequence[int]],
        times: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        check_histories(histories, times)  # all first: a bad id must not leave half a load
        async with self._reaching(None):
            if self.cluster:  # a cluster's pipelines do not load scripts: on every primary now
                await self._client.script_load(_LOAD_LUA)
            for batch in batches(histories.items(), BATCH_USERS):
                async with self._client.pipeline(transaction=False) as pipe:
                    for user, history in batch:
                        items = [int(i) for i in history]
                        recent, at = timed_recent(items, (times or {}).get(user), self.max_recent)
                        blob = encode_profile(recent, items, at)
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
        return reply_text(value) if value is not None else None

    async def claim_epoch(self, token: str) -> str:
        """Store ``token`` as the epoch unless one exists; the epoch stored now."""
        async with self._reaching(self.write_deadline_s):
            await self._client.set(self.epoch_key, token, nx=True)
            value = await self._client.get(self.epoch_key)
        return reply_text(value) if value is not None else token

    async def histories_loaded(self) -> bool:
        """Whether the dataset's histories were merged into this data set (see
        :mod:`service.store.epoch`): a key that goes with the data, as the epoch does."""
        async with self._reaching(self.deadline_s):
            return bool(await self._client.exists(f"{self.epoch_key}:loaded"))

    async def mark_histories_loaded(self) -> None:
        async with self._reaching(self.write_deadline_s):
            await self._client.set(f"{self.epoch_key}:loaded", "1")

    async def merge(
        self,
        histories: Mapping[str, Sequence[int]],
        times: Mapping[str, Sequence[float]] | None = None,
        chunk: int = 5000,
    ) -> None:
        """Add each user's history (raw item ids, oldest first) as events at their ``times``
        (as ``load`` takes them; none: 0, older than any live event): unlike ``load``, what
        the users did since is kept. No deadline: it is bulk work, in calls of about
        ``chunk`` events."""
        check_histories(histories, times)
        batch: list[Interaction] = []
        for user, history in histories.items():
            when = (times or {}).get(user) or [0.0] * len(history)
            batch += [Interaction(user, int(i), t) for i, t in zip(history, when, strict=True)]
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
        """True when Redis fsyncs every write before replying (:mod:`.health`). None when it
        does not answer or hides its configuration (``CONFIG`` renamed away, as on some
        managed services)."""
        try:
            async with self._reaching(self.deadline_s):
                return await fsyncs_every_write(self._client)
        except (StoreUnavailable, rx.ResponseError):
            return None

    async def replication(self) -> str | None:
        """On a cluster, how far a write reaches (:func:`.health.cluster_replication`). None
        for a single Redis, or when the cluster does not answer."""
        if not isinstance(self._client, aioredis.RedisCluster):
            return None
        try:
            async with self._reaching(self.deadline_s):
                nodes = await self._client.cluster_nodes()
        except (StoreUnavailable, rx.ResponseError):
            return None
        return cluster_replication(nodes)

    async def write_refusal(self) -> str | None:
        """Why Redis refuses writes now (:func:`.health.refusing_writes`). None when it takes
        them, does not answer (``ping`` says that) or hides INFO."""
        try:
            async with self._reaching(self.deadline_s):
                return await refusing_writes(self._client)
        except (StoreUnavailable, rx.ResponseError):
            return None

    async def close(self) -> None:
        await self._lag.stop()
        await self._replication.close()
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
