"""Which items this process treats as switched off (``PATCH /items/{id}``), kept current from
the store every ``SWITCH_POLL_S`` (:mod:`service.store.switches`), so every worker and replica
stops recommending an item within that time of its switch."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from service.store.profiles import StoreUnavailable
from service.store.switches import Switches

log = logging.getLogger("visrec.items")
SWITCH_POLL_S = 0.25  # a version read (one HGET) each time


@dataclass
class Availability:
    store: Switches
    off: frozenset[int] = frozenset()  # replaced, never changed
    version: int = -1  # of ``off`` in the store; -1: not read yet

    async def switch(self, item_id: int, *, available: bool) -> None:
        await self.store.switch(item_id, available=available)
        await self.refresh()

    async def refresh(self) -> None:
        """Read the set again if its version moved. A version below this process's means the
        store lost the switches (Redis back empty): they are written back from this copy."""
        version = await self.store.version()
        if version == self.version:
            return
        if version < self.version and self.off:
            log.error(
                "the store lost the switches (version %d, was %d): %d item(s) switched off again",
                version,
                self.version,
                len(self.off),
            )
            for item_id in sorted(self.off):
                await self.store.switch(item_id, available=False)
        self.version, self.off = await self.store.off()

    async def keep_current(self, every_s: float = SWITCH_POLL_S) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
            except StoreUnavailable as err:  # the last set read stays in force
                log.warning("switched-off items not refreshed this time: %s", err)
