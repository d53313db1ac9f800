"""User profiles for serving: each user's recent items (the model's input) and every item they
have seen (excluded from recommendations).

Two stores share one contract, :class:`ProfileStore`: :class:`MemoryProfileStore` in-process,
and :class:`RedisProfileStore`, where several API workers share profiles. Item ids are the
dataset's raw ids, not model indices: integers in ``[0, MAX_ITEM_ID]``. Both stores refuse
others (``ValueError``; ``TypeError`` for non-integers) before changing anything.

Where each part lives: the contract and the rule of a profile here; its encoding in
:mod:`service.store.codec`; the in-process store in :mod:`service.store.memory`; the Redis
store and its key layout in :mod:`service.store.redis.profiles`, its Lua scripts in
``service/store/redis/lua/``; reaching Redis
(clients, deadlines, what a failure means) in :mod:`service.store.redis.client`.

A write that timed out may still have been applied. Sent again with the same event ids, each
event is applied once, as long as its id is still logged: for ``EVENT_TTL_S`` (7 days), and
among the user's newest ``MAX_EVENT_IDS`` (10,000) ids (one user's log was bounded by the TTL
alone: 1.87 M ids in 40 s took 748 MiB in process, 120 MiB per 296 k in Redis; ids are at most
128 characters, so a user's log now holds at most ~2 MB). Events without ids are applied
again, which leaves the same profile only if nothing else reached the user in between (then
``recent`` and ``seen`` are unchanged): give events ids.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, pairwise
from typing import Any, Literal, Protocol, SupportsIndex, TypeVar

from service.errors import RETRY_AFTER_S, ServiceError

MAX_RECENT = 9
EVENT_TTL_S = 7 * 24 * 3600
MAX_EVENT_IDS = 10_000  # per user: a retry after more newer events of that user applies again
MAX_ITEM_ID = 2**53 - 1  # the largest integer a Lua number (a double) holds exactly
MAX_TIMESTAMP_S = 4_102_444_800  # 2100-01-01: times are kept in ms, exact in a double
MAX_CLOCK_SKEW_S = 24 * 3600  # how far ahead of the server's clock an event's time may be
# A user id must be usable in the URL path of GET /recommend/{user_id}: no "/" (a path
# separator, even percent-encoded once decoded) and no control characters.
USER_ID_PATTERN, USER_ID_CHARS = r"^[^/\x00-\x1f\x7f]+$", 128
# Users per pipeline round trip in bulk calls: bounds the client's buffers, not correctness.
BATCH_USERS = 1000

T = TypeVar("T")
Clock = Callable[[], float]


# which store a refusal is about, for its message
StoreKind = Literal["profile", "item", "feedback"]


class StoreUnavailable(ServiceError):
    """The store cannot answer now (see :mod:`service.store.redis.client`): reads may fall back
    to what the caller has, writes should be refused and retried later (503, ``Retry-After``).

    ``maybe_applied``: whether a refused write may have been applied all the same (the call
    reached the store and its reply was lost or late). False when the store certainly applied
    nothing: it refused the call (out of memory, read-only, loading, ...) or was never reached.
    ``store``: which store, for the client's message (profiles, or added items).
    """

    status = 503
    code = "store_unavailable"

    def __init__(
        self, reason: str, *, maybe_applied: bool = True, store: StoreKind = "profile"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.maybe_applied = maybe_applied
        self.store = store

    def of(self, store: StoreKind) -> StoreUnavailable:
        """The same outage, said of ``store``."""
        return StoreUnavailable(self.reason, maybe_applied=self.maybe_applied, store=store)

    @property
    def detail(self) -> str:
        """What a refused client should know of its request (README: "Durability")."""
        said = f"the {self.store} store is unavailable: {self.reason}. "
        return said + _OUTCOMES[self.store, self.maybe_applied]

    def fields(self) -> dict[str, Any]:
        return {"reason": self.reason, "nothing_applied": not self.maybe_applied}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


_OUTCOMES: dict[tuple[StoreKind, bool], str] = {
    ("profile", False): "Nothing was applied; retry later (with event_ids, a retry is always "
    "safe).",
    ("profile", True): "The request reached the store but its answer did not come back in "
    "time: a batch is applied whole or not at all, and which is unknown. Send it again with "
    "the same event_ids: each event is applied at most once.",
    ("item", False): "Nothing was changed; retry later.",
    ("item", True): "The call reached the store and its answer was lost or late, so the item "
    "may have been stored: send the same request again (the same image and title are "
    "accepted again).",
    ("feedback", False): "Nothing was counted; send it again later.",
    ("feedback", True): "The call reached the store and its answer was lost or late, so the "
    "feedback may have been counted: send it again (each impression and click counts once).",
}


class EventConflict(ServiceError, ValueError):
    """Event ids already applied (or repeated in the call) with another item or timestamp: the
    call is refused whole, nothing applied (409)."""

    status = 409
    code = "event_conflict"

    def __init__(self, event_ids: Sequence[str]) -> None:
        names = ", ".join(sorted(event_ids))
        super().__init__(f"event id(s) already used for another item or timestamp: {names}")
        self.event_ids = sorted(event_ids)

    def fields(self) -> dict[str, Any]:
        return {"event_ids": self.event_ids}


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

    @property
    def seconds(self) -> list[float] | None:
        """Each recent item's time in seconds (None: the store kept none)."""
        return [t / 1000 for t in self.times] if len(self.times) == len(self.recent) else None


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

    async def load(
        self,
        histories: Mapping[str, Sequence[int]],
        times: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        """Replace each given user's profile by their history (raw item ids, oldest first);
        ``times``: when each item came, seconds since the epoch (a user without: all 0, older
        than any live event)."""
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


def timed_recent(
    history: Sequence[int], times: Sequence[float] | None, max_recent: int
) -> tuple[list[int], list[int]]:
    """:func:`recent_of`'s items and each one's time in ms at its latest occurrence
    (``times``: seconds, one per history item; None: all 0)."""
    recent = recent_of(history, max_recent)
    if times is None:
        return recent, [0] * len(recent)
    latest = {int(i): millis(t) for i, t in zip(history, times, strict=True)}  # the last wins
    return recent, [latest[i] for i in recent]


def item_id(item: SupportsIndex) -> int:
    """``item`` as an int (numpy integers welcome); a ``ValueError`` outside [0, MAX_ITEM_ID]."""
    value = operator.index(item)
    if not 0 <= value <= MAX_ITEM_ID:
        raise ValueError(f"item ids must be integers in [0, 2**53 - 1], got {value}")
    return value


def check_events(events: Iterable[Interaction]) -> None:
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


def check_histories(
    histories: Mapping[str, Sequence[int]], times: Mapping[str, Sequence[float]] | None = None
) -> None:
    """A ``ValueError`` for a bad item id, or for times that are not one per item, in
    [0, MAX_TIMESTAMP_S] and oldest first."""
    for user, history in histories.items():
        for item in history:
            item_id(item)
        when = (times or {}).get(user)
        if when is None:
            continue
        if len(when) != len(history):
            raise ValueError(f"user {user}: {len(when)} times for {len(history)} items")
        if any(not 0 <= t <= MAX_TIMESTAMP_S for t in when) or any(
            a > b for a, b in pairwise(when)
        ):
            raise ValueError(f"user {user}: times must be in [0, {MAX_TIMESTAMP_S}], oldest first")


def check_limits(max_recent: int, event_ttl_s: int, max_event_ids: int) -> None:
    if max_recent < 1:
        raise ValueError(f"max_recent must be at least 1, got {max_recent}")
    if event_ttl_s < 1:
        raise ValueError(f"event_ttl_s must be at least 1 second, got {event_ttl_s}")
    if max_event_ids < 1:
        raise ValueError(f"max_event_ids must be at least 1, got {max_event_ids}")


def by_user(events: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Events grouped by user, each group in the given order."""
    groups: dict[str, list[Interaction]] = {}
    for event in events:
        groups.setdefault(event.user_id, []).append(event)
    return groups


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch
