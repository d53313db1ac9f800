"""Reads that outlive the profile store: a store in front of another, with a bounded cache.

:class:`ResilientStore` is a :class:`ProfileStore` like the one it wraps (its errors included:
``StoreUnavailable`` reaches callers of ``profiles``, ``add`` and the rest), plus ``read``,
which never raises ``StoreUnavailable``: when the store cannot answer, it returns each user's
profile as last read or written by this process, or an empty one, and says the answer is
degraded. Writes are never cached or queued here: a write the store did not take is refused,
so nothing is acknowledged that the store does not hold.

The cache keeps the ``size`` users read or written most recently (LRU), encoded as the store
encodes them (:func:`encode_profile`, ~100-300 bytes for a profile of ~100 items, where the
decoded sets take ~8 KB): 50,000 users cost ~20 MB per process. Each read refreshes its users'
entries, and a write applied to a cached user updates it with the store's own rule; so during
an outage a user gets what this process last knew. Several processes each keep their own, and
a read that overlaps a write may leave the older profile cached until the next read: the cache
is a fallback for outages, never read while the store answers.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from service.store.codec import decode_profile, encode_profile
from service.store.journal import Journal
from service.store.profiles import (
    Interaction,
    Profile,
    ProfileReads,
    ProfileStore,
    StoreUnavailable,
    by_user,
    millis,
    place,
)

T = TypeVar("T")
log = logging.getLogger("visrec.store")
EMPTY = Profile([], frozenset())


@dataclass(frozen=True)
class ProfileRead:
    profiles: list[Profile]
    degraded: bool  # the store did not answer: profiles are cached ones, or empty


class ProfileCache:
    """The profiles of the ``size`` users most recently put or got (LRU), stored encoded."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"the cache size must be at least 0, got {size}")
        self.size = size
        self._blobs: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blobs)

    def get(self, user_id: str) -> Profile | None:
        blob = self._blobs.get(user_id)
        if blob is None:
            return None
        self._blobs.move_to_end(user_id)
        return decode_profile(blob)

    def put(self, user_id: str, profile: Profile) -> None:
        if self.size == 0:
            return
        times = profile.times or None
        self._blobs[user_id] = encode_profile(profile.recent, profile.seen, times)
        self._blobs.move_to_end(user_id)
        if len(self._blobs) > self.size:
            self._blobs.popitem(last=False)

    def drop(self, user_id: str) -> None:
        self._blobs.pop(user_id, None)


def with_events(
    profile: Profile, events: Sequence[Interaction], max_recent: int, *, now: float
) -> Profile:
    """``profile`` after ``events`` (in order; those without a timestamp at ``now``), by the
    stores' rule (:func:`place`)."""
    recent, times = list(profile.recent), list(profile.times or [0] * len(profile.recent))
    for event in events:
        at = now if event.timestamp is None else event.timestamp
        place(recent, times, int(event.item_id), millis(at), max_recent)
    seen = profile.seen | frozenset(int(e.item_id) for e in events)
    return Profile(recent, seen, tuple(times))


class ResilientStore(ProfileReads):
    """``store``, whose reads fall back to a cache of recent profiles while it is unreachable."""

    def __init__(
        self,
        store: ProfileStore,
        *,
        cache_size: int,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.journal = journal  # keeps what was acknowledged, to write back after a loss
        self._clock = clock  # the time of events without one, in cached profiles
        self.cache = ProfileCache(cache_size)
        self.max_recent = store.max_recent
        self._reachable = True  # as last seen; only used to log changes once

    async def read(self, user_ids: Sequence[str]) -> ProfileRead:
        """Per user, the stored profile; when the store cannot answer, the cached one or an
        empty one, with ``degraded`` set. Never raises ``StoreUnavailable``."""
        try:
            return ProfileRead(await self.profiles(user_ids), degraded=False)
        except StoreUnavailable:
            return ProfileRead([self.cache.get(u) or EMPTY for u in user_ids], degraded=True)

    async def profiles(self, user_ids: Sequence[str]) -> list[Profile]:
        found = await self._reaching(self.store.profiles(user_ids))
        for user, profile in zip(user_ids, found, strict=True):
            if profile.recent or profile.seen:  # an unknown user's empty profile is no news
                self.cache.put(user, profile)
        return found

    async def add(self, events: Sequence[Interaction]) -> int:
        """The store's ``add``; cached profiles of its users follow when all events applied.
        When some were skipped (already applied), which ones is unknown: those users' cache
        entries are dropped rather than guessed. The journal, if any, keeps them once the store
        acknowledged them."""
        applied = await self._reaching(self.store.add(events))
        if self.journal is not None:
            self.journal.record(events)
        now = self._clock()
        for user, group in by_user(events).items():
            cached = self.cache.get(user)
            if cached is not None and applied == len(events):
                self.cache.put(user, with_events(cached, group, self.max_recent, now=now))
            elif cached is not None:
                self.cache.drop(user)
        return applied

    async def load(
        self,
        histories: Mapping[str, Sequence[int]],
        times: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        await self._reaching(self.store.load(histories, times))
        for user in histories:
            self.cache.drop(user)

    async def ping(self) -> bool:
        ok = await self.store.ping()
        self._note(reachable=ok)
        return ok

    async def durable(self) -> bool | None:
        return await self.store.durable()

    async def replication(self) -> str | None:
        return await self.store.replication()

    async def write_refusal(self) -> str | None:
        return await self.store.write_refusal()

    async def close(self) -> None:
        await self.store.close()

    async def _reaching(self, call: Awaitable[T]) -> T:
        """``call``'s result, noting whether the store answered (for the log)."""
        try:
            result = await call
        except StoreUnavailable as exc:
            self._note(reachable=False, why=str(exc))
            raise
        self._note(reachable=True)
        return result

    def _note(self, *, reachable: bool, why: str = "") -> None:
        if reachable != self._reachable:
            if reachable:
                log.warning("the profile store answers again")
            else:
                log.warning("the profile store is unavailable: %s", why or "ping failed")
        self._reachable = reachable
