"""Top-k search over the model's item vectors with FAISS (inner product).

The vectors come from :meth:`service.model.acf.ACF.item_vectors`, which folds the score scale and
item bias in, so the inner product *is* the model's score and an exact index returns exactly the
model's ranking. Results are item indices ``1..N`` (the model's numbering).

A query may name the items it may return (``allowed``: business rules, a category page). That is
applied inside the search, never by over-fetching: a FAISS ``IDSelectorBitmap`` for the flat, IVF
and HNSW indexes, or, when fewer than ``EXACT_BELOW`` items pass (or the index is on a GPU), an
exact ranking of the passing items' vectors. An approximate index that finds fewer than the
passing items it was asked for (a graph walk under a filter that 1% of items pass returned 7 of
10) is answered exactly too, so an answer has ``min(k, passing)`` items.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from service.files import write_atomically

log = logging.getLogger("visrec.index")
IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[IndexKind, ...] = ("flat", "ivf", "hnsw")


# Fewer passing items than this are ranked exactly, by their vectors (gathered once per filter:
# 25.6 MB at 100,000 x 64, ranked in ~1 ms), instead of an index walk that skips most of what
# it meets: HNSW under a filter that 5% of a million items pass found 0.662 of the best 20
EXACT_BELOW = 100_000


@dataclass(frozen=True)
class Allowed:
    """The items a query may be answered with, over the indices 1..N: as FAISS's bitmap (bit
    i - 1 for item i, little-endian) and as sorted indices. Made once per filter and engine
    (:meth:`of`), then shared by every request with that filter."""

    bits: np.ndarray  # (ceil(N / 8),) uint8
    items: np.ndarray  # (passing,) int64, sorted
    _gathered: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes + self.items.nbytes + sum(g.nbytes for g in self._gathered)

    def vectors(self, every: np.ndarray) -> np.ndarray:
        """The passing items' rows of ``every`` (N, D), gathered once: ranking them is then
        one product over contiguous rows (0.46 ms for 50,000 x 64, against 1.6 ms gathering
        them each time)."""
        if not self._gathered:
            self._gathered.append(np.ascontiguousarray(every[self.items - 1]))
        return self._gathered[0]

    @classmethod
    def of(cls, mask: np.ndarray) -> Allowed:
        """From a (N + 1,) bool mask over the indices (0 unused)."""
        return cls(np.packbits(mask[1:], bitorder="little"), np.flatnonzero(mask[1:]) + 1)

    def has(self, items: np.ndarray) -> np.ndarray:
        """Which of ``items`` (indices 1..N) pass."""
        i = np.asarray(items, dtype=np.int64) - 1
        return ((self.bits[i >> 3] >> (i & 7)) & 1).astype(bool)

    def bits_without(self, items: np.ndarray) -> tuple[np.ndarray, int]:
        """The bitmap with these items (indices 1..N) taken out, e.g. those a user has seen,
        and how many items it then lets through. The sorted indices are not made again: at
        500,000 passing items that took 4 ms a request, more than the search."""
        out = np.unique(items[self.has(items)]) - 1
        if not len(out):
            return self.bits, len(self.items)
        bits = self.bits.copy()
        np.bitwise_and.at(bits, out >> 3, ~(1 << (out & 7)).astype(np.uint8))
        return bits, len(self.items) - len(out)


@dataclass(frozen=True)
class Hits:
    items: np.ndarray  # (B, k) item indices 1..N; 0 where fewer than k items were left
    scores: np.ndarray  # (B, k) float32; -inf where items is 0
    passing: np.ndarray  # (B,) items each query could be answered from (allowed, not excluded)


def gpu_available() -> bool:
    """FAISS was built with GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class ItemIndex:
    """An inner-product index; ``flat`` is exact, ``ivf`` and ``hnsw`` approximate."""

    def __init__(
        self,
        vectors: np.ndarray,
        *,
        kind: IndexKind = "flat",
        use_gpu: bool | None = None,
        threads: int = 0,
        cache: Path | None = None,
    ) -> None:
        """``vectors`` (N, D); ``use_gpu`` None means "when available"; ``threads`` 0 keeps
        FAISS's default for batches (single queries always run on one thread); ``cache``: a
        folder where an approximate index built for these very vectors is kept and found
        again (building HNSW over a million vectors takes minutes, reading it a second)."""
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        if data.ndim != 2 or len(data) == 0:
            raise ValueError(f"item vectors must be a non-empty (N, D) array, got {data.shape}")
        self.kind = kind
        self.n_items, self.dim = data.shape
        self.threads = threads or faiss.omp_get_max_threads()
        index = (
            _build(data, kind) if cache is None or kind == "flat" else _cached(data, kind, cache)
        )
        self.on_gpu = bool(gpu_available() if use_gpu is None else use_gpu) and kind != "hnsw"
        if self.on_gpu:
            self._gpu = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu, 0, index)
        self._index = index
        self._vectors = data  # for exact rankings of the items a filter lets through

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[Collection[int]] | None = None,
        offset: int = 0,
        allowed: Sequence[Allowed | None] | None = None,
    ) -> Hits:
        """Best ``k`` items after skipping the first ``offset``, per query (B, D).

        Items in ``exclude[b]`` (indices 1..N) are never returned for query b, and, where
        ``allowed[b]`` is given, only the items it lets through are; the answer still has
        ``k`` items whenever that many are left.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {q.shape}")
        if k < 1 or offset < 0:
            raise ValueError(f"k must be >= 1 and offset >= 0, got k={k}, offset={offset}")
        exclude = exclude or [()] * len(q)
        allowed = allowed or [None] * len(q)
        if len(exclude) != len(q) or len(allowed) != len(q):
            raise ValueError("exclude and allowed need one entry per query")
        # One thread per single query: on a small machine the OpenMP start-up costs more
        # than the scan it would share.
        faiss.omp_set_num_threads(1 if len(q) == 1 else self.threads)
        wanted = k + offset
        found: list[tuple[list[int], list[float]]] = [([], [])] * len(q)
        passing = np.zeros(len(q), dtype=np.int64)
        rows = [b for b, mask in enumerate(allowed) if mask is None]
        if rows:
            items, scores = self._search(q[rows], [exclude[b] for b in rows], wanted)
            for j, b in enumerate(rows):
                found[b] = items[j], scores[j]
                passing[b] = self.n_items - len(exclude[b])
        for b, mask in enumerate(allowed):
            if mask is not None:
                passing[b], found[b] = self._search_allowed(q[b : b + 1], mask, exclude[b], wanted)
        return _pad([f[0] for f in found], [f[1] for f in found], k, offset, passing)

    def _search(
        self, q: np.ndarray, exclude: Sequence[Collection[int]], wanted: int
    ) -> tuple[list[list[int]], list[list[float]]]:
        depth = min(self.n_items, wanted + max((len(e) for e in exclude), default=0))
        while True:
            scores, ids = self._index.search(q, depth)
            items, kept = _filter(ids, scores, exclude, wanted)
            if depth >= self.n_items or all(len(row) >= wanted for row in items):
                return items, kept
            depth = min(self.n_items, depth * 2)  # approximate indexes may return too few

    def _search_allowed(
        self, q: np.ndarray, allowed: Allowed, exclude: Collection[int], wanted: int
    ) -> tuple[int, tuple[list[int], list[float]]]:
        """How many items pass, and the best ``wanted`` of them, for one query (1, D)."""
        if len(allowed.bits) != -(-self.n_items // 8):
            raise ValueError(f"allowed is over {8 * len(allowed.bits)} items, not {self.n_items}")
        excluded = np.fromiter(exclude, dtype=np.int64, count=len(exclude))
        if len(allowed.items) < EXACT_BELOW or self.on_gpu:
            return self._exact(q[0], allowed, excluded, wanted)
        bits, passing = allowed.bits_without(excluded)
        wanted = min(wanted, passing)
        if wanted == 0:
            return 0, ([], [])
        selector = faiss.IDSelectorBitmap(self.n_items, faiss.swig_ptr(bits))
        scores, ids = self._index.search(q, wanted, params=_params(self._index, selector))
        got = ids[0] >= 0
        if got.sum() == wanted:
            return passing, ((ids[0][got] + 1).tolist(), scores[0][got].tolist())
        return self._exact(q[0], allowed, excluded, wanted)  # the walk found too few

    def _exact(
        self, q: np.ndarray, allowed: Allowed, excluded: np.ndarray, wanted: int
    ) -> tuple[int, tuple[list[int], list[float]]]:
        """The best ``wanted`` of the allowed items but ``excluded``, ranked by their vectors."""
        items = allowed.items
        scores = allowed.vectors(self._vectors) @ q
        place = np.searchsorted(items, excluded)
        inside = place < len(items)
        out = place[inside][items[place[inside]] == excluded[inside]]  # excluded that pass
        scores[out] = -np.inf
        passing = len(items) - len(out)
        wanted = min(wanted, passing)
        if wanted == 0:
            return 0, ([], [])
        top = np.argpartition(-scores, wanted - 1)[:wanted]
        top = top[np.argsort(-scores[top], kind="stable")]
        return passing, (items[top].tolist(), scores[top].tolist())


def _params(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters with ``selector``, keeping the index's own search-time settings."""
    if isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = index.hnsw.efSearch
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = index.nprobe
    else:
        params = faiss.SearchParameters()
    params.sel = selector
    return params


def _build(data: np.ndarray, kind: IndexKind) -> faiss.Index:
    index = {"flat": _flat, "hnsw": _hnsw, "ivf": _ivf}[kind](data)
    index.add(data)
    return _tuned(index)


def _cached(data: np.ndarray, kind: IndexKind, folder: Path) -> faiss.Index:
    """The index from ``folder`` when one was built there for ``kind`` with these parameters
    (the folder must be for these vectors), else built and left there."""
    path = folder / f"index-{kind}-{_BUILD[kind]}.faiss"
    if path.is_file():
        index = faiss.read_index(str(path))
        if (index.ntotal, index.d) == data.shape:
            return _tuned(index)
        log.warning("%s holds an index of other vectors: building a new one", path)
    index = _build(data, kind)
    try:
        write_atomically(path, lambda tmp: faiss.write_index(index, str(tmp)))
    except (OSError, RuntimeError) as err:  # FAISS reports I/O errors as RuntimeError
        log.warning("cannot keep the %s index in %s (%s)", kind, folder, err)
    return index


# What an index is built with, in its cache file's name: a change makes a new file.
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 80
_BUILD = {"flat": "", "hnsw": f"m{HNSW_M}-efc{HNSW_EF_CONSTRUCTION}", "ivf": "sqrt4"}
HNSW_EF_SEARCH = 128


def _flat(data: np.ndarray) -> faiss.Index:
    return faiss.IndexFlatIP(data.shape[1])


def _hnsw(data: np.ndarray) -> faiss.Index:
    index = faiss.IndexHNSWFlat(data.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def _ivf(data: np.ndarray) -> faiss.Index:
    n, d = data.shape
    nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # FAISS wants ~39 points per list
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(data)
    return index


def _tuned(index: faiss.Index) -> faiss.Index:
    """Search-time parameters (not stored with an index)."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(index.nlist, max(8, index.nlist // 8))
    return index


def _filter(
    ids: np.ndarray, scores: np.ndarray, exclude: Sequence[Collection[int]], wanted: int
) -> tuple[list[list[int]], list[list[float]]]:
    items, kept = [], []
    for row_ids, row_scores, excluded in zip(ids, scores, exclude, strict=True):
        row_items: list[int] = []
        row_kept: list[float] = []
        for i, s in zip(row_ids.tolist(), row_scores.tolist(), strict=True):
            if i >= 0 and (i + 1) not in excluded:
                row_items.append(i + 1)
                row_kept.append(s)
                if len(row_items) == wanted:
                    break
        items.append(row_items)
        kept.append(row_kept)
    return items, kept


def _pad(
    items: list[list[int]], scores: list[list[float]], k: int, offset: int, passing: np.ndarray
) -> Hits:
    out_items = np.zeros((len(items), k), dtype=np.int64)
    out_scores = np.full((len(items), k), -np.inf, dtype=np.float32)
    for b, (row_items, row_scores) in enumerate(zip(items, scores, strict=True)):
        page = row_items[offset : offset + k]
        out_items[b, : len(page)] = page
        out_scores[b, : len(page)] = row_scores[offset : offset + k]
    return Hits(out_items, out_scores, passing)
