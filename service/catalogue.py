"""Item titles, images and attributes of a dataset folder, for the page and for filters.

Read from the folder's ``items.csv`` (``item_id,title,genres,image``; ``image`` relative to the
folder; any other column is an attribute, its values ``|``-separated as genres are, e.g. a
``brand`` or ``category`` column to filter on). An image path is kept only when it resolves,
symlinks followed, to an image file inside the folder: whatever a row says, nothing outside
the dataset folder is ever served.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from service.filters import GENRES, Attributes, Changes, Row, year_of

log = logging.getLogger("visrec.catalogue")
IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
}


@dataclass(frozen=True)
class CatalogueItem:
    item_id: int
    title: str
    image: Path | None  # absolute, inside the dataset folder; None when missing or unsafe
    # the image itself, for items added while serving (POST /items), which have no file
    data: bytes | None = None
    data_type: str | None = None
    genres: tuple[str, ...] = ()
    # other attributes (items.csv's other columns, POST /items's): (name, values), by name
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def row(self) -> Row:
        values = {GENRES: frozenset(self.genres)} if self.genres else {}
        values |= {name: frozenset(v) for name, v in self.attributes if v}
        return Row(self.item_id, values, year_of(self.title))

    @property
    def media_type(self) -> str | None:
        if self.data is not None:
            return self.data_type
        return IMAGE_TYPES.get(self.image.suffix.lower()) if self.image else None

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.data is not None


@dataclass(frozen=True)
class Catalogue:
    items: dict[int, CatalogueItem] = field(default_factory=dict)
    # the attributes of ``items`` as columns, built on first use after each change, and
    # the last changes overlaid on them
    _attributes: list[tuple[dict[int, CatalogueItem], Attributes]] = field(
        default_factory=list, repr=False, compare=False
    )
    _changed: list[tuple[Attributes, Changes, Attributes]] = field(
        default_factory=list, repr=False, compare=False
    )

    def get(self, item_id: int) -> CatalogueItem | None:
        return self.items.get(item_id)

    def attributes(self, changes: Changes | None = None) -> Attributes:
        """Every item's attributes, for filters (:mod:`service.filters`), with ``changes``
        (PATCH's) overlaid. ``changes`` is compared by identity: a new set is a new mapping."""
        items = self.items
        if not self._attributes or self._attributes[0][0] is not items:
            built = Attributes(i.row() for i in items.values())
            self._attributes[:] = [(items, built)]
        base = self._attributes[0][1]
        if not changes:
            return base
        kept = self._changed[0] if self._changed else None
        if kept is None or kept[0] is not base or kept[1] is not changes:
            self._changed[:] = [(base, changes, base.changed(changes))]
        return self._changed[0][2]

    def add(self, *items: CatalogueItem) -> None:
        """Items added while serving; the dict is replaced, not changed, so a reader never
        sees it half-way (once for all of them: 10,000 added at start-up one at a time copied
        it 10,000 times)."""
        object.__setattr__(self, "items", {**self.items, **{i.item_id: i for i in items}})


def safe_image_path(root: Path, relative: str) -> Path | None:
    """``root / relative`` resolved, or None unless it is an existing image file inside ``root``
    (no absolute paths, no ``..``, no symlink leading out, no other file types)."""
    parts = PurePosixPath(relative.replace("\\", "/"))
    if not relative or parts.is_absolute() or ".." in parts.parts:
        return None
    base = root.resolve()
    path = (base / parts).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path if path.suffix.lower() in IMAGE_TYPES else None


OWN_COLUMNS = frozenset({"item_id", "title", "genres", "image"})  # not attributes


def _values(cell: str | None) -> tuple[str, ...]:
    return tuple(v for v in (cell or "").split("|") if v)


def load_catalogue(folder: Path | None) -> Catalogue:
    """The items of ``folder/items.csv``; an empty catalogue when ``folder`` is None."""
    if folder is None:
        return Catalogue()
    items: dict[int, CatalogueItem] = {}
    with (folder / "items.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            item_id = int(row["item_id"])
            image = safe_image_path(folder, row.get("image") or "")
            genres = _values(row.pop("genres", ""))
            others = tuple(
                sorted(
                    (name, _values(value))
                    for name, value in row.items()
                    if isinstance(name, str) and name not in OWN_COLUMNS and _values(value)
                )
            )
            items[item_id] = CatalogueItem(
                item_id, row.get("title") or "", image, genres=genres, attributes=others
            )
    missing = sum(item.image is None for item in items.values())
    if missing:
        log.warning("%d of %d items have no image inside %s", missing, len(items), folder)
    return Catalogue(items)
