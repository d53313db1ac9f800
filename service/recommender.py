"""Online recommendation logic, independent of the web framework.

Ids at this boundary are the dataset's raw ids (users as strings, so brand-new users need no
registration); the model's indices stay inside.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.diversity import pool_size, rerank
from service.errors import ServiceError
from service.filters import CACHED_FILTERS, Passing
from service.index.item_index import Allowed, IndexKind, ItemIndex
from service.model.acf import PAD, UNKNOWN_USER
from service.model.checkpoint import Checkpoint
from service.model.projection import Projected, RawFeatures
from service.model.serving import Explanation, Serving
from service.model.tags import is_title_tag


@dataclass(frozen=True)
class Query:
    user_id: str | None  # None: an anonymous history
    history: Sequence[int]  # raw item ids, oldest first; only the last `profile_size` count
    exclude: Collection[int]  # raw item ids never to return
    k: int
    offset: int = 0
    only: Passing | None = None  # the items it may return (a filter's); None: any
    diversity: float = 0.0  # 0..1: how far the maximal-marginal-relevance re-rank goes
    # when each history item came (seconds since the epoch), for a model that reads how long
    # ago each came; None: all in one visit
    times: Sequence[float] | None = None


@dataclass(frozen=True)
class Recommendation:
    items: list[int]  # raw item ids, best first
    scores: list[float]
    fallback: bool  # popular items: nothing was known about the user
    version: str  # of the model that ranked it (a reload may swap models between requests)
    passing: int | None = None  # items it could be answered from (filter, not excluded)
    arm: str = ""  # the experiment arm that answered (``<experiment>/<arm>``); "": none runs


# The masks (and the passing items' gathered vectors) an engine keeps for the filters it met
FILTER_CACHE_BYTES = 256 << 20


class ItemExistsError(ServiceError, ValueError):
    status = 409
    code = "item_exists"

    def __init__(self, items: Sequence[int]) -> None:
        super().__init__(f"item id(s) already in the catalogue: {', '.join(map(str, items))}")
        self.items = list(items)


class UnknownItemsError(ServiceError, ValueError):
    """A well-formed request naming items the model does not know; none of it is applied."""

    status = 422
    code = "unknown_items"

    def __init__(self, items: Sequence[int]) -> None:
        super().__init__(f"unknown item id(s): {', '.join(map(str, items))}")
        self.items = list(items)

    def fields(self) -> dict[str, Any]:
        return {"unknown_item_ids": self.items}


class Recommender:
    """``item_ids``: raw id of item index i + 1; ``user_ids``: raw id of user index u;
    ``popularity``: training interactions per item, for users with nothing to go on."""

    def __init__(
        self,
        serving: Serving,
        *,
        item_ids: Sequence[int],
        user_ids: Sequence[int | str],
        popularity: Sequence[float] | np.ndarray,
        index: IndexKind = "flat",
        index_cache: Path | None = None,
        profile_size: int = 9,
        version: str = "",
    ) -> None:
        """``index_cache``: where an approximate index of these item vectors is kept between
        starts (see :class:`ItemIndex`)."""
        self.serving = serving
        self.index = ItemIndex(serving.item_vectors, kind=index, cache=index_cache)
        self.profile_size = profile_size
        self.version = version
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self._user_ids = list(user_ids)
        self._item_index = {int(raw): i + 1 for i, raw in enumerate(self.item_ids.tolist())}
        self._by_raw = np.argsort(self.item_ids, kind="stable")  # item_ids[_by_raw] sorted
        self._allowed_of: dict[Passing, Allowed] = {}  # the last filters', oldest first
        self._user_index = {str(raw): u for u, raw in enumerate(self._user_ids)}
        counts = np.asarray(popularity, dtype=np.float64)
        self._popular = np.argsort(-counts, kind="stable") + 1  # item indices, most popular first
        self._popularity = counts

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        serving: Serving,
        *,
        index: IndexKind = "flat",
        index_cache: Path | None = None,
        version: str = "",
    ) -> Recommender:
        """The engine for ``ckpt``, reading as many of a user's newest items as it was trained
        on."""
        return cls(
            serving,
            item_ids=ckpt.item_ids,
            user_ids=ckpt.user_ids,
            popularity=ckpt.item_popularity or np.zeros(len(ckpt.item_ids)),
            index=index,
            index_cache=index_cache,
            profile_size=ckpt.profile_size,
            version=version or ckpt.code_version,
        )

    def with_items(
        self,
        raw_ids: Sequence[int],
        features: RawFeatures | Projected,
        tags: Sequence[Iterable[str]] | None = None,
    ) -> Recommender:
        """A new engine whose catalogue also holds these items, scored from their (M, K, C)
        raw image features or their rows through its projection (:meth:`project`) (and, by a
        model with metadata, their tags: genres and title, :func:`service.model.tags.item_tags`);
        this one is left as it is (requests in flight keep it).
        Raises ItemExistsError for ids it has, ValueError when the model cannot score new
        items."""
        taken = sorted(i for i in raw_ids if i in self._item_index)
        if taken or len(set(raw_ids)) != len(raw_ids):
            raise ItemExistsError(taken or sorted(raw_ids))
        return Recommender(
            self.serving.with_items(features, tags),
            item_ids=[*self.item_ids.tolist(), *raw_ids],
            user_ids=self._user_ids,
            popularity=np.concatenate([self._popularity, np.zeros(len(raw_ids))]),
            index=self.index.kind,
            profile_size=self.profile_size,
            version=self.version,
        )

    def knows(self, raw_id: int) -> bool:
        return raw_id in self._item_index

    @property
    def projection_key(self) -> str | None:
        """Names what new items' raw features go through (None: nothing, or no images read):
        rows projected by one engine serve any engine with the same key."""
        return self.serving.projection_key

    def project(self, features: RawFeatures) -> Projected:
        return self.serving.project(features)

    @property
    def tags(self) -> tuple[str, ...]:
        """The metadata vocabulary (genres, title words) the served model reads of an item;
        () : none."""
        return self.serving.tags

    @property
    def takes_new_items(self) -> bool:
        """Whether items it was not trained on can be scored (from their image or metadata)."""
        return self.serving.takes_new_items

    def refuses_new_item(self, tags: Collection[str]) -> str | None:
        """Why an item it was not trained on, with these tags (:func:`item_tags`), cannot be
        added; None when it can."""
        if not self.takes_new_items:
            return "the serving model cannot score items it was not trained on"
        if not self.serving.reads_images and not set(tags) & set(self.tags):
            genres = [t for t in self.tags if not is_title_tag(t)]
            words = " or a title with words it knows" if len(genres) < len(self.tags) else ""
            return (
                "the serving model scores no images and places a new item by its metadata: "
                f"send a genre it knows ({', '.join(genres)}){words}"
            )
        return None

    def unknown_items(self, raw_ids: Collection[int]) -> list[int]:
        return sorted({i for i in raw_ids if i not in self._item_index})

    def require_known(self, raw_ids: Collection[int]) -> None:
        """Raise UnknownItemsError naming every id of ``raw_ids`` the model does not know."""
        unknown = self.unknown_items(raw_ids)
        if unknown:
            raise UnknownItemsError(unknown)

    def recommend(self, queries: Sequence[Query]) -> list[Recommendation]:
        """One attention forward and one index search for the whole batch."""
        users = np.array([self._user(q.user_id) for q in queries], dtype=np.int64)
        made = [self._profile(q.history, q.times) for q in queries]
        profiles, times = np.stack([p for p, _ in made]), np.stack([t for _, t in made])
        known = (users != UNKNOWN_USER) & self.serving.reads_users
        personal = known | (profiles != PAD).any(axis=1)
        out: list[Recommendation | None] = [None] * len(queries)
        rows = np.flatnonzero(personal).tolist()
        if len(rows):
            vectors = self.serving.queries(users[rows], profiles[rows], times[rows])
            # one search deep enough for every page (and diversity pool) in the batch, then
            # each query's slice
            depth = max(self._depth(queries[r]) for r in rows)
            hits = self.index.search(
                vectors,
                depth,
                exclude=[self._indices(queries[r].exclude) for r in rows],
                allowed=[self._allowed(queries[r].only) for r in rows],
            )
            for j, r in enumerate(rows):
                query = queries[r]
                items, scores = self._diverse(query, hits.items[j], hits.scores[j])
                page = slice(query.offset, query.offset + query.k)
                items, scores = items[page], scores[page]
                keep = items > 0
                out[r] = Recommendation(
                    self.raw_ids(items[keep]),
                    scores[keep].tolist(),
                    False,
                    self.version,
                    int(hits.passing[j]),
                )
        for r in np.flatnonzero(~personal).tolist():
            out[r] = self._popular_answer(queries[r])
        return [o for o in out if o is not None]

    def explain(
        self,
        user_id: str | None,
        history: Sequence[int],
        item: int,
        times: Sequence[float] | None = None,
    ) -> Explanation:
        """The attentions behind ``item`` for this user, over the same profile ``recommend``
        ranks with (history items the model does not know are left out there too; ``times``
        as a :class:`Query`'s)."""
        if item not in self._item_index:
            raise UnknownItemsError([item])
        profile, when = self._profile(history, times)
        user = self._user(user_id)
        return self.serving.explain(user, profile.tolist(), self._item_index[item], when.tolist())

    def raw_ids(self, indices: np.ndarray) -> list[int]:
        return self.item_ids[np.asarray(indices) - 1].tolist()

    def _user(self, user_id: str | None) -> int:
        return self._user_index.get(user_id, UNKNOWN_USER) if user_id is not None else UNKNOWN_USER

    def _profile(
        self, history: Sequence[int], times: Sequence[float] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Last ``profile_size`` known items, PAD on the left (unknown ids are ignored), and
        their times in whole seconds (0 on PAD, and for all of them without ``times``)."""
        if times is not None and len(times) != len(history):
            raise ValueError(f"{len(history)} history items but {len(times)} times")
        when = times if times is not None else [0.0] * len(history)
        pairs = zip(history, when, strict=True)
        known = [(self._item_index[i], t) for i, t in pairs if i in self._item_index]
        tail = known[-self.profile_size :]
        items = np.full(self.profile_size, PAD, dtype=np.int64)
        seconds = np.zeros(self.profile_size, dtype=np.int64)
        if tail:
            items[self.profile_size - len(tail) :] = [i for i, _ in tail]
            seconds[self.profile_size - len(tail) :] = np.floor([t for _, t in tail])
        return items, seconds

    def _indices(self, raw_ids: Collection[int]) -> set[int]:
        return {self._item_index[i] for i in raw_ids if i in self._item_index}

    def _depth(self, query: Query) -> int:
        wanted = query.k + query.offset
        return pool_size(wanted, len(self.item_ids)) if query.diversity > 0 else wanted

    def _diverse(
        self, query: Query, items: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The search's items re-ranked for ``query.diversity`` (as they are at 0)."""
        if query.diversity <= 0:
            return items, scores
        found = items > 0
        items, scores = items[found], scores[found]
        vectors = self.serving.item_vectors[items - 1]
        order = rerank(scores, vectors, query.k + query.offset, query.diversity)
        return items[order], scores[order]

    def _allowed(self, only: Passing | None) -> Allowed | None:
        """What the index may answer with: the items of ``only`` this engine knows, made once
        for the last ``CACHED_FILTERS`` filters within ``FILTER_CACHE_BYTES`` (from a thread
        of the batcher or the loop: a race makes the same mask twice, harmlessly)."""
        if only is None:
            return None
        found = self._allowed_of.get(only)
        if found is None:
            place = np.searchsorted(self.item_ids, only.ids, sorter=self._by_raw)
            index = self._by_raw[np.minimum(place, len(self.item_ids) - 1)]
            mask = np.zeros(len(self.item_ids) + 1, dtype=bool)
            mask[index[self.item_ids[index] == only.ids] + 1] = True  # unknown ids: none
            found = self._allowed_of[only] = Allowed.of(mask)
            while len(self._allowed_of) > CACHED_FILTERS or (
                len(self._allowed_of) > 1
                and sum(a.nbytes for a in self._allowed_of.values()) > FILTER_CACHE_BYTES
            ):
                self._allowed_of.pop(next(iter(self._allowed_of)), None)
        return found

    def _popular_answer(self, query: Query) -> Recommendation:
        excluded = self._indices(query.exclude)
        allowed = self._allowed(query.only)
        popular = self._popular if allowed is None else self._popular[allowed.has(self._popular)]
        ranked = [i for i in popular.tolist() if i not in excluded]
        page = np.array(ranked[query.offset : query.offset + query.k], dtype=np.int64)
        return Recommendation(
            self.raw_ids(page) if len(page) else [],
            self._popularity[page - 1].astype(float).tolist() if len(page) else [],
            True,
            self.version,
            len(ranked),
        )
