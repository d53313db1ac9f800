"""Events from a Redis Stream, applied to the profiles as ``POST /interactions`` applies them
(``visrec-ingest``, :mod:`service.ingest_cli`).

**The contract.** A producer appends one entry per event to ``<prefix>:events``::

    XADD visrec:events * user_id alice item_id 50 [timestamp 1700000000.5] [event_id e-123]

(the same fields as ``POST /interactions``; a Kafka topic feeds it through a bridge that XADDs
each message with these fields). Consumers share the group ``visrec-ingest``, each with a name
of its own, any number of them, in any number of processes:

- **At least once.** An entry is acknowledged (XACK) only once the profile store applied its
  event (as durably as ``POST /interactions``: ``VISREC_REDIS_WAIT_REPLICAS`` included) or it
  went to the dead letters. A consumer that dies leaves its entries pending; every consumer
  claims entries idle for ``claim_idle_ms`` (XAUTOCLAIM) and applies them again.
- **Once in the profiles.** Applying again changes nothing: every event has an id, its
  ``event_id`` or else ``stream:<entry id>``, and the store applies an id once.
- **Dead letters.** An entry that can never apply (a field missing or malformed, an item the
  model does not know, a time more than a day ahead, an event id used for another event) is
  appended to ``<prefix>:events:dead`` with its fields, ``source_id`` and ``reason``, and
  acknowledged. An entry the store could not take now (Redis down) stays pending: retried.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.typing import EncodableT, FieldT

from service.store.profiles import (
    MAX_CLOCK_SKEW_S,
    MAX_TIMESTAMP_S,
    USER_ID_CHARS,
    USER_ID_PATTERN,
    EventConflict,
    Interaction,
    StoreUnavailable,
)

log = logging.getLogger("visrec.ingest")
GROUP = "visrec-ingest"
USER_ID = re.compile(USER_ID_PATTERN)  # as POST /interactions reads them
MAX_EVENT_ID = 128

Entry = tuple[str, dict[str, str]]  # entry id, fields


@dataclass(frozen=True)
class Dead:
    entry_id: str
    fields: dict[str, str]
    reason: str


def stream_keys(prefix: str) -> tuple[str, str]:
    """(the events' stream, its dead letters)"""
    return f"{prefix}:events", f"{prefix}:events:dead"


def parse(entry_id: str, fields: dict[str, str], known: Container[int], now: float) -> Interaction:
    """The entry's event, or ValueError saying why it can never apply."""
    user = fields.get("user_id", "")
    if not USER_ID.match(user) or len(user) > USER_ID_CHARS:
        raise ValueError("user_id missing, or not 1-128 characters without '/' or controls")
    try:
        item = int(fields["item_id"])
    except (KeyError, ValueError):
        raise ValueError("item_id missing or not an integer") from None
    if item not in known:
        raise ValueError(f"unknown item {item}: the model does not know it")
    timestamp = None
    if "timestamp" in fields:
        try:
            timestamp = float(fields["timestamp"])
        except ValueError:
            raise ValueError("timestamp is not a number") from None
        if not math.isfinite(timestamp) or not 0 <= timestamp <= MAX_TIMESTAMP_S:
            raise ValueError(f"timestamp outside [0, {MAX_TIMESTAMP_S}]")
        if timestamp > now + MAX_CLOCK_SKEW_S:
            raise ValueError("timestamp more than a day ahead of the clock")
    event_id = fields.get("event_id") or f"stream:{entry_id}"
    if len(event_id) > MAX_EVENT_ID:
        raise ValueError(f"event_id longer than {MAX_EVENT_ID} characters")
    return Interaction(user, item, timestamp, event_id)


class ProfileWriter(Protocol):
    """What a consumer needs of the profile store (``RedisProfileStore``)."""

    async def add(self, events: Sequence[Interaction]) -> int: ...


@dataclass
class Consumer:
    """One consumer of the group: call :meth:`setup` once, then :meth:`step` (or :meth:`run`)."""

    client: aioredis.Redis | aioredis.RedisCluster
    store: ProfileWriter
    prefix: str
    name: str
    known: Callable[[], Container[int]]  # the items the model knows now
    batch: int = 1000
    block_ms: int = 500
    claim_idle_ms: int = 2000
    clock: Callable[[], float] = time.time
    applied: int = 0  # events this consumer applied (not counting those applied before)
    dead: int = 0  # entries it moved to the dead letters
    _cursor: str = field(default="0-0", repr=False)

    @property
    def stream(self) -> str:
        return stream_keys(self.prefix)[0]

    async def setup(self) -> None:
        """The group, reading the stream from its start (entries before it included)."""
        try:
            await self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except rx.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def step(self) -> int:
        """Claim entries idle too long (a dead consumer's), then read new ones; handle both.
        How many entries were handled."""
        reply = await self.client.xautoclaim(
            self.stream, GROUP, self.name, self.claim_idle_ms, self._cursor, count=self.batch
        )
        self._cursor = _text(reply[0])
        claimed = _entries(reply[1])
        gone = [_text(i) for i in reply[2]] if len(reply) > 2 else []  # trimmed meanwhile
        if gone:
            await self.client.xack(self.stream, GROUP, *gone)
        handled = await self.handle(claimed) if claimed else 0
        read: Any = await self.client.xreadgroup(
            GROUP, self.name, {self.stream: ">"}, count=self.batch, block=self.block_ms
        )
        for _, entries in read or ():
            handled += await self.handle(_entries(entries))
        return handled

    async def handle(self, entries: list[Entry]) -> int:
        """Apply the entries' events, dead-letter those that can never apply, acknowledge
        both; StoreUnavailable leaves them pending (claimed again once idle)."""
        events, dead = self._sorted(entries)
        while events:
            try:
                self.applied += await self.store.add([e for _, e in events])
                break
            except EventConflict as err:  # ids applied before with another event
                taken = set(err.event_ids)
                reason = "event_id already used for another item or timestamp"
                dead += [Dead(i, fields, reason) for i, fields in _by_id(entries, events, taken)]
                events = [(i, e) for i, e in events if e.event_id not in taken]
        if dead:
            await self._bury(dead)
        await self.client.xack(self.stream, GROUP, *[i for i, _ in entries])
        return len(entries)

    def _sorted(self, entries: list[Entry]) -> tuple[list[tuple[str, Interaction]], list[Dead]]:
        """(the events that may apply, the entries that never will); an event id repeated in
        the batch for the same event is applied once, for another event is dead."""
        known, now = self.known(), self.clock()
        events: dict[str, tuple[str, Interaction]] = {}
        dead: list[Dead] = []
        for entry_id, fields in entries:
            try:
                event = parse(entry_id, fields, known, now)
            except ValueError as err:
                dead.append(Dead(entry_id, fields, str(err)))
                continue
            first = events.setdefault(event.event_id or entry_id, (entry_id, event))[1]
            if (first.item_id, first.timestamp) != (event.item_id, event.timestamp):
                dead.append(Dead(entry_id, fields, "event_id repeated for another event"))
        return list(events.values()), dead

    async def _bury(self, dead: list[Dead]) -> None:
        letters = stream_keys(self.prefix)[1]
        async with self.client.pipeline(transaction=False) as pipe:
            for d in dead:
                letter: dict[FieldT, EncodableT] = {k: v for k, v in d.fields.items()}
                letter["source_id"], letter["reason"] = d.entry_id, d.reason
                pipe.xadd(letters, letter)
            await pipe.execute()
        self.dead += len(dead)
        log.warning("%d entr(ies) dead-lettered, e.g. %s: %s", len(dead), *_first(dead))

    async def run(self, stop: asyncio.Event) -> None:
        """Steps until ``stop`` is set; a store or Redis that cannot answer is waited out."""
        await self.setup()
        while not stop.is_set():
            try:
                await self.step()
            except (StoreUnavailable, rx.ConnectionError, rx.TimeoutError, OSError) as err:
                log.warning("consumer %s waits for Redis: %s", self.name, err)
                await asyncio.sleep(1.0)


def _by_id(
    entries: list[Entry], events: list[tuple[str, Interaction]], ids: set[str]
) -> list[Entry]:
    wanted = {i for i, e in events if e.event_id in ids}
    return [(i, f) for i, f in entries if i in wanted]


def _first(dead: list[Dead]) -> tuple[str, str]:
    return dead[0].entry_id, dead[0].reason


def _entries(raw: Sequence[tuple[bytes | str, dict[bytes | str, bytes | str]]]) -> list[Entry]:
    return [
        (_text(i), {_text(k): _text(v) for k, v in (fields or {}).items()}) for i, fields in raw
    ]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
