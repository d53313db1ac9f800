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
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis
from redis import exceptions as rx

from service.store.codec import decode_profile, encode_profile
from service.store.deadline import LoopLag
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
    recent_of,
)
from service.store.redis_client import (
    reaching,
    redis_client,
    reply_text,
    single_client,
    write_refusal,
)

# before it runs: Redis refuses it whole (OOM) when used memory is over maxmemory. Without one,
# Redis checks only the first write command, and after it lets every later write of the script
# through: the add script's first command, ZREMRANGEBYSCORE, made every script run past
# maxmemory (40 batches of 1,000 new users acknowledged and 10 MB over a 1 MB limit).
_SHEBANG = "#!lua\n"

# The scripts, in ./lua/: the add script (a call's events, atomically, with the varint helpers
# it needs) and the load script (one user's profile replaced). Each file says what its KEYS and
# ARGV are.
_LUA = resources.files("service.store") / "lua"


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
        (``WAIT``, up to ``wait_timeout_ms``), else raises StoreUnavailable (maybe applied):
        then a failover, which promotes a replica, keeps every acknowledged write. On a
        cluster that takes a client of the user's primary (``timeout_s``, ``max_connections``:
        as the store's own client was made with)."""
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
            self._nodes[node.name] = single_client(
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
        check_histories(histories)  # all of them first: a bad id must not leave half a load
        async with self._reaching(None):
            if self.cluster:  # a cluster's pipelines do not load scripts: on every primary now
                await self._client.script_load(_LOAD_LUA)
            for batch in batches(histories.items(), BATCH_USERS):
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

    async def merge(self, histories: Mapping[str, Sequence[int]], chunk: int = 5000) -> None:
        """Add each user's history (raw item ids, oldest first) as events at time 0, older
        than any live event: unlike ``load``, what the users did since is kept. No deadline:
        it is bulk work, in calls of about ``chunk`` events."""
        check_histories(histories)
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
