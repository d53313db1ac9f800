"""The events this process acknowledged, kept to write them back when Redis loses its data.

Redis with AOF ``always`` keeps every acknowledged event through a crash, but not through a
``FLUSHALL``, a restart without its data (no persistence, a lost volume) or a failover to an
empty replica: the epoch watch (:mod:`service.store.epoch`) notices, and the dataset's
histories are merged back, but the live events users sent since were gone for good.

So each process keeps, in memory, the last ``max_events`` events it acknowledged, as they were
sent, and after a loss the watch writes them back, oldest first, through the store's own
``add``. Writing an event again is harmless: a profile holds distinct items ordered by their
latest time, so the same (user, item, time) twice is the profile it was once, and an event id
sent again for the same event counts as applied (so a client's retry after the restore is still
applied once). An event sent without a time is placed at the time it is written back, after
the ones written back before it: the order of such events is kept, not their times.

What it does not cover, said where it is configured (``VISREC_JOURNAL_EVENTS``) and in the
README: events older than the last ``max_events`` of a process, and the events of a process
that died before the loss was noticed (its journal died with it).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from service.store.profiles import EventConflict, Interaction

log = logging.getLogger("visrec.store")

REPLAY_BATCH = 500  # events per write when writing back


class Journal:
    def __init__(self, max_events: int) -> None:
        if max_events < 0:
            raise ValueError(f"the journal's size must be at least 0, got {max_events}")
        self._events: deque[Interaction] = deque(maxlen=max_events)
        self.forgotten = 0  # acknowledged events pushed out by newer ones

    def __len__(self) -> int:
        return len(self._events)

    def record(self, events: Sequence[Interaction]) -> None:
        """Keep ``events``, which the store acknowledged."""
        maxlen = self._events.maxlen or 0
        self.forgotten += max(0, len(self._events) + len(events) - maxlen)
        self._events.extend(events)

    async def replay(self, add: Callable[[Sequence[Interaction]], Awaitable[int]]) -> int:
        """Write every kept event again through ``add`` (a store's), oldest first; how many
        were written. A batch refused for an event id that now names another event (a client
        reused it after the loss) is written one event at a time, skipping those. Raises
        ``StoreUnavailable`` when the store cannot take them: the caller tries again."""
        events, written = list(self._events), 0
        for start in range(0, len(events), REPLAY_BATCH):
            batch = events[start : start + REPLAY_BATCH]
            try:
                await add(batch)
                written += len(batch)
            except EventConflict:
                for event in batch:
                    try:
                        await add([event])
                        written += 1
                    except EventConflict:
                        log.warning("not written back, its id names another event: %s", event)
        return written
