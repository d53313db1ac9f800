"""What a request may be answered with: filters on the catalogue's item attributes.

An item's attributes are its genres (from ``items.csv`` or ``POST /items``) and its year (from
a title ending in ``(1995)``, as MovieLens titles do; none otherwise). A filter keeps the items
with at least one of ``genres``, none of ``exclude_genres``, and a year within
``year_min..year_max`` (an item without a year fails a year bound). :class:`Attributes` holds
them as columns, so a filter is a few vectorised operations over the catalogue, whatever its
size; the engine applies the result inside the index search
(:mod:`service.index.item_index`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from service.model.tags import YEAR


@dataclass(frozen=True)
class ItemFilter:
    genres: frozenset[str] = frozenset()  # at least one of them; empty: any
    exclude_genres: frozenset[str] = frozenset()
    year_min: int | None = None
    year_max: int | None = None

    def __bool__(self) -> bool:
        return (
            bool(self.genres or self.exclude_genres)
            or self.year_min is not None
            or (self.year_max is not None)
        )


@dataclass(frozen=True, eq=False)
class Passing:
    """The raw ids (sorted) one filter lets through, in one catalogue: the same object for the
    same filter while the catalogue stays (compared by identity), so an engine can keep the
    mask it made of it instead of making it again for every request (at a million items,
    25 ms a request)."""

    ids: np.ndarray = field(repr=False)


CACHED_FILTERS = 64  # the filters whose result each catalogue's attributes keep


def year_of(title: str) -> int | None:
    found = YEAR.search(title)
    return int(found[1]) if found else None


class Attributes:
    """Every catalogue item's genres and year, as columns over its raw ids (sorted)."""

    def __init__(self, items: Iterable[tuple[int, Iterable[str], str]]) -> None:
        """``items``: (raw id, genres, title) of each item."""
        rows = sorted((item_id, frozenset(genres), title) for item_id, genres, title in items)
        self.ids = np.array([r[0] for r in rows], dtype=np.int64)
        names = sorted({g for r in rows for g in r[1]})
        column = {g: c for c, g in enumerate(names)}
        self.genre_names = tuple(names)
        self._genres = np.zeros((len(rows), len(names)), dtype=bool)
        for i, (_, genres, _) in enumerate(rows):
            self._genres[i, [column[g] for g in genres]] = True
        years = [year_of(title) for _, _, title in rows]
        self._years = np.array([np.nan if y is None else y for y in years], dtype=np.float64)
        self._cached: OrderedDict[ItemFilter, Passing] = OrderedDict()

    def passing(self, spec: ItemFilter) -> Passing:
        """The items ``spec`` keeps; the last ``CACHED_FILTERS`` filters' are kept."""
        found = self._cached.get(spec)
        if found is None:
            found = self._cached[spec] = Passing(self._passing(spec))
            if len(self._cached) > CACHED_FILTERS:
                self._cached.popitem(last=False)
        self._cached.move_to_end(spec)
        return found

    def _passing(self, spec: ItemFilter) -> np.ndarray:
        keep = np.ones(len(self.ids), dtype=bool)
        if spec.genres:
            keep &= self._any_of(spec.genres)
        if spec.exclude_genres:
            keep &= ~self._any_of(spec.exclude_genres)
        if spec.year_min is not None:
            keep &= self._years >= spec.year_min  # NaN compares False: no year fails
        if spec.year_max is not None:
            keep &= self._years <= spec.year_max
        return self.ids[keep]

    def _any_of(self, genres: frozenset[str]) -> np.ndarray:
        columns = [c for c, g in enumerate(self.genre_names) if g in genres]
        return np.asarray(self._genres[:, columns].any(axis=1))
