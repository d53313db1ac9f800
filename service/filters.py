"""What a request may be answered with: filters on the catalogue's item attributes.

An item's attributes are named lists of values: its ``genres`` (from ``items.csv`` or
``POST /items``), the other columns of ``items.csv`` (``|``-separated, as genres are), the
``attributes`` given to ``POST /items``, and its ``year`` (from a title ending in ``(1995)``, as
MovieLens titles do; none otherwise). ``PATCH /items/{id}`` changes any of them at run time
(:class:`Changes`, overlaid on the catalogue's own).

A filter keeps the items with at least one of ``genres``, none of ``exclude_genres``, for each
name in ``having`` at least one of its values, for each name in ``lacking`` none of its
values, and a year within ``year_min..year_max`` (an item without a year fails a year bound).
:class:`Attributes` holds the catalogue's attributes as columns, so a filter is a few
vectorised operations over the catalogue, whatever its size, plus one check per changed
item; the engine applies the result inside the index search
(:mod:`service.index.item_index`).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from service.errors import ServiceError
from service.model.tags import YEAR

GENRES = "genres"
YEAR_NAME = "year"  # filtered by range (year_min, year_max), never by value
Named = tuple[tuple[str, frozenset[str]], ...]  # (name, values), sorted by name
# What PATCH changed of each item: name -> values, or ``year`` -> a year
Changes = Mapping[int, Mapping[str, tuple[str, ...] | int]]


def named(conditions: Mapping[str, Iterable[str]]) -> Named:
    return tuple(sorted((name, frozenset(values)) for name, values in conditions.items()))


@dataclass(frozen=True)
class ItemFilter:
    genres: frozenset[str] = frozenset()  # at least one of them; empty: any
    exclude_genres: frozenset[str] = frozenset()
    year_min: int | None = None
    year_max: int | None = None
    having: Named = ()  # for each name, at least one of its values
    lacking: Named = ()  # for each name, none of its values

    def __bool__(self) -> bool:
        return (
            bool(self.genres or self.exclude_genres or self.having or self.lacking)
            or self.year_min is not None
            or (self.year_max is not None)
        )

    @property
    def names(self) -> frozenset[str]:
        """The attribute names its conditions read (``genres`` and ``year`` aside)."""
        return frozenset(name for name, _ in (*self.having, *self.lacking))

    def _any(self) -> Named:
        return ((GENRES, self.genres),) * bool(self.genres) + self.having

    def _none(self) -> Named:
        return ((GENRES, self.exclude_genres),) * bool(self.exclude_genres) + self.lacking

    def accepts(self, values: Mapping[str, frozenset[str]], year: int | None) -> bool:
        """Whether one item with these attributes passes (the columns' rule, for one item)."""
        if not all(values.get(name, frozenset()) & wanted for name, wanted in self._any()):
            return False
        if any(values.get(name, frozenset()) & banned for name, banned in self._none()):
            return False
        if (self.year_min is not None or self.year_max is not None) and year is None:
            return False
        return (self.year_min is None or year >= self.year_min) and (  # type: ignore[operator]
            self.year_max is None or year <= self.year_max  # type: ignore[operator]
        )


class UnknownAttributesError(ServiceError):
    """A filter naming attributes no item has (a misspelt name must not pass everything)."""

    status = 422
    code = "unknown_attributes"

    def __init__(self, unknown: Iterable[str], known: Iterable[str]) -> None:
        self.unknown, self.known = sorted(unknown), sorted(known)
        super().__init__(
            f"no item has the attribute(s) {', '.join(map(repr, self.unknown))} "
            f"(known: {', '.join(self.known)})"
        )

    def fields(self) -> dict[str, list[str]]:
        return {"unknown_attributes": self.unknown, "known_attributes": self.known}


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


@dataclass(frozen=True)
class Row:
    """One item's attributes, as :class:`Attributes` is built from."""

    item_id: int
    values: Mapping[str, frozenset[str]]
    year: int | None

    def changed(self, change: Mapping[str, tuple[str, ...] | int]) -> Row:
        values = dict(self.values)
        year = self.year
        for name, value in change.items():
            if name == YEAR_NAME:
                year = int(value)  # type: ignore[arg-type]
            else:
                values[name] = frozenset(value)  # type: ignore[arg-type]
        return Row(self.item_id, values, year)


class Attributes:
    """Every catalogue item's attributes, as columns over its raw ids (sorted): for each name,
    each value's items (raw ids, sorted). :meth:`changed` overlays what PATCH changed and
    :meth:`added` takes new items, neither building the columns again."""

    def __init__(self, rows: Iterable[Row]) -> None:
        self._rows = {r.item_id: r for r in rows}
        self.ids = np.array(sorted(self._rows), dtype=np.int64)
        self._years = np.array([_year(self._rows[i]) for i in self.ids.tolist()], dtype=float)
        self._columns = _columns(self._rows.values())
        self._changed: dict[int, Row] = {}  # overlaid: rows whose values PATCH changed
        self._cached: OrderedDict[ItemFilter, Passing] = OrderedDict()

    def added(self, rows: Iterable[Row]) -> Attributes:
        """These attributes with items of new ids (items added while serving): numpy work
        over the columns, no pass over every item in Python (a million of them took
        seconds)."""
        new = sorted((r for r in rows if r.item_id not in self._rows), key=lambda r: r.item_id)
        if not new:
            return self
        ids = np.array([r.item_id for r in new], dtype=np.int64)
        at = np.searchsorted(self.ids, ids)
        out = self._copy()
        out._rows = {**self._rows, **{r.item_id: r for r in new}}
        out.ids = np.insert(self.ids, at, ids)
        out._years = np.insert(self._years, at, [_year(r) for r in new])
        out._columns = {name: dict(values) for name, values in self._columns.items()}
        for name, values in _columns(new).items():
            column = out._columns.setdefault(name, {})
            for value, more in values.items():
                column[value] = np.sort(np.concatenate([column.get(value, more[:0]), more]))
        return out

    def _copy(self) -> Attributes:
        out = object.__new__(Attributes)
        out.__dict__.update(self.__dict__)
        out._cached = OrderedDict()
        return out

    @property
    def names(self) -> frozenset[str]:
        """The attribute names a filter may use: those some item has, and ``genres``."""
        changed = (name for row in self._changed.values() for name in row.values)
        return frozenset({GENRES, *self._columns, *changed})

    def row(self, item_id: int) -> Row | None:
        """An item's attributes, with what PATCH changed."""
        return self._changed.get(item_id) or self._rows.get(item_id)

    def changed(self, changes: Changes) -> Attributes:
        """These attributes with ``changes`` overlaid (items not in the catalogue ignored):
        the columns are shared, only the filters' results are computed anew."""
        out = self._copy()
        out._changed = {
            n: self._rows[n].changed(change) for n, change in changes.items() if n in self._rows
        }
        return out

    def passing(self, spec: ItemFilter) -> Passing:
        """The items ``spec`` keeps; the last ``CACHED_FILTERS`` filters' are kept. A name
        no item has is refused (:class:`UnknownAttributesError`)."""
        if spec.names and not spec.names <= self.names:
            raise UnknownAttributesError(spec.names - self.names, self.names)
        found = self._cached.get(spec)
        if found is None:
            found = self._cached[spec] = Passing(self._passing(spec))
            if len(self._cached) > CACHED_FILTERS:
                self._cached.popitem(last=False)
        self._cached.move_to_end(spec)
        return found

    def _passing(self, spec: ItemFilter) -> np.ndarray:
        keep = np.ones(len(self.ids), dtype=bool)
        for name, values in spec._any():
            keep &= self._any_of(name, values)
        for name, values in spec._none():
            keep &= ~self._any_of(name, values)
        if spec.year_min is not None:
            keep &= self._years >= spec.year_min  # NaN compares False: no year fails
        if spec.year_max is not None:
            keep &= self._years <= spec.year_max
        if self._changed:  # the columns hold the catalogue's own values: these decide anew
            at = np.searchsorted(self.ids, list(self._changed))
            keep[at] = [spec.accepts(r.values, r.year) for r in self._changed.values()]
        return self.ids[keep]

    def _any_of(self, name: str, values: frozenset[str]) -> np.ndarray:
        mask = np.zeros(len(self.ids), dtype=bool)
        column = self._columns.get(name, {})
        for value in column.keys() & values:
            mask[np.searchsorted(self.ids, column[value])] = True
        return mask


def _year(row: Row) -> float:
    return np.nan if row.year is None else row.year


def _columns(rows: Iterable[Row]) -> dict[str, dict[str, np.ndarray]]:
    """For each name, each value's items (raw ids, sorted)."""
    found: defaultdict[str, defaultdict[str, list[int]]]
    found = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for name, values in row.values.items():
            for value in values:
                found[name][value].append(row.item_id)
    return {
        name: {v: np.sort(np.array(items, dtype=np.int64)) for v, items in values.items()}
        for name, values in found.items()
    }
