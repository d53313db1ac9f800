"""What ``PATCH /items/{id}`` set, as this process sees it: the items switched off and the
attributes changed, kept current from the store every ``PATCH_POLL_S``
(:mod:`service.store.patches`), so every worker and replica stops recommending an item, or
filters it by its new attributes, within that time of the change."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from service.filters import Changes
from service.store.patches import ItemTable
from service.store.profiles import StoreUnavailable

log = logging.getLogger("visrec.items")
PATCH_POLL_S = 0.25  # a version read (one HGET) a table each time


@dataclass
class Mirror:
    """This process's copy of one table."""

    table: ItemTable
    name: str  # for the log
    version: int = -1  # of ``fields`` in the store; -1: not read yet
    fields: dict[str, str] = field(default_factory=dict)  # replaced, never changed

    async def refresh(self) -> bool:
        """Read the table again if its version moved; whether it did. A version below this
        process's means the store lost the table (Redis back empty): it is written back from
        this copy."""
        version = await self.table.version()
        if version == self.version:
            return False
        if version < self.version and self.fields:
            log.error(
                "the store lost the %s (version %d, was %d): %d entries written back",
                self.name,
                version,
                self.version,
                len(self.fields),
            )
            await self.table.put(self.fields)
        self.version, self.fields = await self.table.read()
        return True


@dataclass
class Patches:
    switches: Mirror  # field: an item switched off
    changed: Mirror  # field: "<item>:<attribute>", value: JSON
    off: frozenset[int] = frozenset()  # replaced, never changed
    changes: Changes = field(default_factory=dict)  # replaced, never changed

    @classmethod
    def of(cls, switches: ItemTable, changed: ItemTable) -> Patches:
        return cls(Mirror(switches, "switched-off items"), Mirror(changed, "changed attributes"))

    async def switch(self, item_id: int, *, available: bool) -> None:
        await self.switches.table.put({str(item_id): None if available else "1"})
        await self.refresh()

    async def change(
        self, item_id: int, values: Mapping[str, tuple[str, ...] | int | None]
    ) -> None:
        """Set attributes of one item (None: back to the catalogue's own), all at once."""
        fields = {f"{item_id}:{n}": None if v is None else json.dumps(v) for n, v in values.items()}
        await self.changed.table.put(fields)
        await self.refresh()

    async def refresh(self) -> None:
        if await self.switches.refresh():
            self.off = frozenset(int(f) for f in self.switches.fields)
        if await self.changed.refresh():
            self.changes = _changes(self.changed.fields)

    async def keep_current(self, every_s: float = PATCH_POLL_S) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
            except StoreUnavailable as err:  # the last tables read stay in force
                log.warning("changed items not refreshed this time: %s", err)

    async def close(self) -> None:
        await self.switches.table.close()
        await self.changed.table.close()


def _changes(fields: Mapping[str, str]) -> Changes:
    out: dict[int, dict[str, tuple[str, ...] | int]] = {}
    for name, value in fields.items():
        item, attribute = name.split(":", 1)
        read = json.loads(value)
        out.setdefault(int(item), {})[attribute] = read if isinstance(read, int) else tuple(read)
    return out
