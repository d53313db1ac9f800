"""The in-process profile store (one process; gone with it), bounded to the users read or
written most recently."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from service.store.profiles import (
    EVENT_TTL_S,
    MAX_EVENT_IDS,
    MAX_RECENT,
    Clock,
    EventConflict,
    Interaction,
    Profile,
    ProfileReads,
    by_user,
    check_events,
    check_histories,
    check_limits,
    millis,
    payload,
    place,
    timed_recent,
)


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
        check_limits(max_recent, event_ttl_s, max_event_ids)
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
        check_events(events)
        async with self._lock:
            now = self._clock()
            groups = by_user(events)
            for user in groups:
                self._forget_expired(user, now)
            conflicts = [c for user, group in groups.items() for c in self._conflicts(user, group)]
            if conflicts:
                raise EventConflict(conflicts)
            applied = sum(self._apply(user, group, now) for user, group in groups.items())
            self._evict()
            return applied

    async def load(
        self,
        histories: Mapping[str, Sequence[int]],
        times: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        check_histories(histories, times)
        async with self._lock:
            for user, history in histories.items():
                recent, at = timed_recent(history, (times or {}).get(user), self.max_recent)
                self._profiles[user] = _Profile(recent, at, {int(i) for i in history})
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
