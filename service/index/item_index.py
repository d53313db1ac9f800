"""Top-k search over the model's item vectors with FAISS (inner product).

The vectors come from :meth:`service.model.acf.ACF.item_vectors`, which folds the score scale and
item bias in, so the inner product *is* the model's score and an exact index returns exactly the
model's ranking. Results are item indices ``1..N`` (the model's numbering).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

log = logging.getLogger("visrec.index")
IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[IndexKind, ...] = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class Hits:
    items: np.ndarray  # (B, k) item indices 1..N; 0 where fewer than k items were left
    scores: np.ndarray  # (B, k) float32; -inf where items is 0


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

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[Collection[int]] | None = None,
        offset: int = 0,
    ) -> Hits:
        """Best ``k`` items after skipping the first ``offset``, per query (B, D).

        Items in ``exclude[b]`` (indices 1..N) are never returned for query b, and the answer
        still has ``k`` items whenever the catalogue has that many left.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {q.shape}")
        if k < 1 or offset < 0:
            raise ValueError(f"k must be >= 1 and offset >= 0, got k={k}, offset={offset}")
        exclude = exclude or [()] * len(q)
        if len(exclude) != len(q):
            raise ValueError("exclude needs one collection per query")
        wanted = k + offset
        depth = min(self.n_items, wanted + max((len(e) for e in exclude), default=0))
        # One thread per single query: on a small machine the OpenMP start-up costs more
        # than the scan it would share.
        faiss.omp_set_num_threads(1 if len(q) == 1 else self.threads)
        while True:
            scores, ids = self._index.search(q, depth)
            items, kept = _filter(ids, scores, exclude, wanted)
            if depth >= self.n_items or all(len(row) >= wanted for row in items):
                break
            depth = min(self.n_items, depth * 2)  # approximate indexes may return too few
        return _pad(items, kept, k, offset)


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
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        faiss.write_index(index, str(partial))
        partial.replace(path)
    except (OSError, RuntimeError) as err:  # FAISS reports I/O errors as RuntimeError
        log.warning("cannot keep the %s index in %s (%s)", kind, folder, err)
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
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


def _pad(items: list[list[int]], scores: list[list[float]], k: int, offset: int) -> Hits:
    out_items = np.zeros((len(items), k), dtype=np.int64)
    out_scores = np.full((len(items), k), -np.inf, dtype=np.float32)
    for b, (row_items, row_scores) in enumerate(zip(items, scores, strict=True)):
        page = row_items[offset : offset + k]
        out_items[b, : len(page)] = page
        out_scores[b, : len(page)] = row_scores[offset : offset + k]
    return Hits(out_items, out_scores)
